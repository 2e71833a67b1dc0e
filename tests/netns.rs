//! Real-kernel tests in network namespaces: TUN, raw sockets, routes, captures, independent ESP
//! peers (scapy, tshark). They need root; without it they fail, unless ESPIP_SKIP_NETNS=1 says
//! to skip them (for a developer's unprivileged `cargo test`). Namespaces are named
//! `espip-<tag>-<pid>-<host>` and deleted when a test ends, also when it fails.

use espip::lab::netns::{self, Daemon, Netns};
use espip::lab::p2p::{self, LabKeys, LabMode, SPI_A_TO_B, SPI_B_TO_A};
use espip::sa::Cipher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The heavy tests share two cores; one at a time keeps their timing honest.
static SERIAL: Mutex<()> = Mutex::new(());

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_espip"))
}

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("ESPIP_SKIP_NETNS").is_some() {
        eprintln!("skipped: not root and ESPIP_SKIP_NETNS is set");
        return false;
    }
    panic!("namespace tests need root (or set ESPIP_SKIP_NETNS=1 to skip them)");
}

/// Run `espip lab ARGS --no-install`, require it to succeed, and return its report.
fn lab_scenario(args: &[&str]) -> String {
    let out = Command::new(exe())
        .arg("lab")
        .args(args)
        .arg("--no-install")
        .output()
        .expect("run espip lab");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lab {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn lab(args: &[&str]) -> String {
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

#[test]
fn p2p_esp_aes128_50mb() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = lab(&["--cipher", "aes-128-gcm", "--megabytes", "50"]);
    assert!(t.contains("no plaintext on the wire"), "{t}");
    assert!(t.contains("7 passed"), "{t}");
}

#[test]
fn p2p_esp_aes256_esn_50mb() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    lab(&["--cipher", "aes-256-gcm", "--esn", "--megabytes", "50"]);
}

#[test]
fn p2p_esp_chacha20_50mb() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    lab(&["--cipher", "chacha20-poly1305", "--megabytes", "50"]);
}

#[test]
fn p2p_ipip_50mb() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = lab(&["--mode", "ipip", "--megabytes", "50"]);
    assert!(t.contains("only protocol 4"), "{t}");
}

/// Two namespaces on a veth with espip running in A only, from the lab's own config.
struct HalfLab {
    a: Netns,
    b: Netns,
    daemon: Daemon,
    keys: LabKeys,
    dir: PathBuf,
}

impl Drop for HalfLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn half_lab(tag: &str, cipher: Cipher) -> HalfLab {
    half_lab_with(tag, cipher, "")
}

/// `half_lab` with `extra` appended to A's configuration.
fn half_lab_with(tag: &str, cipher: Cipher, extra: &str) -> HalfLab {
    half_lab_mode(tag, LabMode::Esp(cipher), cipher, extra)
}

fn half_lab_mode(tag: &str, mode: LabMode, cipher: Cipher, extra: &str) -> HalfLab {
    let (a, b) = p2p::topology(tag).unwrap();
    let keys = LabKeys::generate(cipher).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("a.toml");
    std::fs::write(
        &cfg,
        p2p::config_text(mode, true, Some(&keys), false, &dir.join("state")) + extra,
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

fn scapy_interop(tag: &str, cipher: Cipher, udp: bool) {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mode = if udp {
        LabMode::EspUdp(cipher)
    } else {
        LabMode::Esp(cipher)
    };
    let mut h = half_lab_mode(tag, mode, cipher, "");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/scapy_peer.py");
    let out = netns::run(
        h.b.command("/usr/bin/python3")
            .arg(&script)
            .args(["--cipher", cipher.name()])
            .args(["--key-a-to-b", h.keys.a_to_b.to_hex().as_str()])
            .args(["--key-b-to-a", h.keys.b_to_a.to_hex().as_str()])
            .args(["--spi-a-to-b", &format!("{SPI_A_TO_B:#x}")])
            .args(["--spi-b-to-a", &format!("{SPI_B_TO_A:#x}")])
            .arg("--hostile")
            // As if a NAT had mapped B's port 4500 to 4501: espip must answer there.
            .args(if udp {
                &["--udp", "--sport", "4501"][..]
            } else {
                &[]
            }),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "scapy peer failed ({cipher:?}): {stdout}\n{}\nespip status: {}\nespip log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        status_at(&h.dir.join("state/control.sock")).to_text(0.0),
        h.daemon.log()
    );
    assert!(stdout.contains("\"replies\": [1, 2, 3, 4, 5]"), "{stdout}");
    // `espip show --json` counts exactly what scapy sent.
    let st = status_at(&h.dir.join("state/control.sock"));
    let p = &st.peers[0];
    assert_eq!(p.mode, if udp { "esp-udp" } else { "esp" });
    if udp {
        assert_eq!(
            p.endpoint, "192.0.2.2:4501",
            "the port B's datagrams came from"
        );
    }
    assert_eq!((p.rx_packets, p.tx_packets), (5, 5), "{p:?}");
    assert_eq!(p.sa_in.as_ref().unwrap().highest_seq, 5, "{p:?}");
    assert_eq!(p.sa_out.as_ref().unwrap().next_seq, 6, "{p:?}");
    assert!(p.last_rx_unix.is_some() && p.last_tx_unix.is_some());
    for (reason, n) in [
        ("replay", 1),
        ("bad_icv", 1),
        ("unknown_spi", 1),
        ("malformed", 1),
        ("nat_keepalive", u64::from(udp)),
        ("non_esp", u64::from(udp)),
    ] {
        assert_eq!(st.drops[reason], n, "{reason}: {:?}", st.drops);
    }
    for reason in [
        "wrong_source",
        "bad_padding",
        "not_allowed",
        "bad_next_header",
    ] {
        assert_eq!(st.drops[reason], 0, "{reason}: {:?}", st.drops);
    }
    assert!(h.daemon.stop().unwrap(), "clean stop");
    let log = h.daemon.log();
    assert!(
        log.contains("replay=1"),
        "the replayed request is counted: {log}"
    );
    assert!(!h.a.has_link("espip0"));
}

#[test]
fn scapy_interop_aes128() {
    scapy_interop("scapy128", Cipher::Aes128Gcm, false);
}

#[test]
fn scapy_interop_aes256() {
    scapy_interop("scapy256", Cipher::Aes256Gcm, false);
}

#[test]
fn scapy_interop_chacha20() {
    scapy_interop("scapycc", Cipher::ChaCha20Poly1305, false);
}

/// scapy's NAT-T encapsulation (ESP in UDP 4500) against a daemon with mode = "esp-udp".
#[test]
fn scapy_interop_esp_in_udp_aes128_and_chacha20() {
    scapy_interop("scapyu128", Cipher::Aes128Gcm, true);
    scapy_interop("scapyucc", Cipher::ChaCha20Poly1305, true);
}

#[test]
fn tshark_decrypts_a_lab_capture_with_the_exported_sas() {
    tshark_check("esp");
}

/// ESP in UDP: Wireshark's UDP-encapsulation dissector hands port 4500 to ESP, which decrypts
/// with the same SA lines. Only the daemon's outer tap is read: on the veth a GSO train of
/// datagrams is one frame, which no dissector splits (docs/captures.md).
#[test]
fn tshark_decrypts_the_esp_in_udp_outer_tap() {
    tshark_check("esp-udp");
}

fn tshark_check(mode: &str) {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("espip-test-tshark-{mode}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    lab(&[
        "--mode",
        mode,
        "--cipher",
        "aes-128-gcm",
        "--megabytes",
        "2",
        "--pcap",
        dir.to_str().unwrap(),
    ]);
    // Wireshark reads its esp_sa table from the personal configuration directory.
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".config/wireshark")).unwrap();
    std::fs::copy(dir.join("esp_sa"), home.join(".config/wireshark/esp_sa")).unwrap();
    // Lines of `fields` of the frames of `file` matching `filter`; for decrypted ESP the last
    // occurrence of a field is the inner packet's.
    let tshark = |file: &str, filter: &str, fields: &[&str]| -> Vec<String> {
        let mut cmd = Command::new("tshark");
        cmd.env("HOME", &home)
            .args(["-n", "-r"])
            .arg(dir.join(file))
            .args(["-o", "esp.enable_encryption_decode:TRUE"])
            .args(["-o", "esp.enable_authentication_check:TRUE"])
            .args(["-Y", filter, "-T", "fields", "-E", "occurrence=l"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = cmd.output().expect("tshark (apt-get install tshark)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let count = |file: &str, filter: &str| tshark(file, filter, &["frame.number"]).len();
    // The link capture (tcpdump on A's veth).
    let esp = count("wire.pcap", "esp");
    let good = count("wire.pcap", "esp.icv_good == 1");
    let inner_tcp = count("wire.pcap", "esp && tcp");
    // The daemon's own taps on A: the outer tap decrypts to exactly the IPv4 packets of the
    // inner tap (same source, destination, IP ID, length and TCP sequence number).
    let outer_tap = "host-a/espip0-outer.pcap";
    let inner_tap = "host-a/espip0-inner.pcap";
    let tap_esp = count(outer_tap, "esp");
    let tap_good = count(outer_tap, "esp.icv_good == 1");
    let fields = ["ip.src", "ip.dst", "ip.id", "ip.len", "tcp.seq_raw"];
    let mut decrypted = tshark(outer_tap, "esp && ip", &fields);
    let mut plain = tshark(inner_tap, "ip", &fields);
    decrypted.sort();
    plain.sort();
    let udp_in_tap = count(outer_tap, "udp.port == 4500 && esp");
    let _ = std::fs::remove_dir_all(&dir);
    if mode == "esp" {
        assert!(esp > 1000, "capture has {esp} ESP packets");
        assert_eq!(good, esp, "tshark verified the ICV of every ESP packet");
        assert_eq!(
            inner_tcp, esp,
            "tshark decrypted every packet to the inner TCP segment"
        );
    } else {
        assert_eq!(
            udp_in_tap, tap_esp,
            "every ESP packet of the tap is in UDP 4500"
        );
    }
    assert!(tap_esp > 1000, "outer tap has {tap_esp} ESP packets");
    assert_eq!(tap_good, tap_esp, "every ICV in the outer tap verifies");
    assert_eq!(
        decrypted.len(),
        tap_esp,
        "every outer packet decrypts to IPv4"
    );
    assert!(
        decrypted == plain,
        "outer tap (decrypted) and inner tap differ: {} vs {} packets",
        decrypted.len(),
        plain.len()
    );
}

#[test]
fn sigkill_leaves_nothing_and_restart_works() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = half_lab("kill", Cipher::Aes128Gcm);
    assert!(h.a.has_link("espip0"));
    assert!(!h
        .daemon
        .stop_with(nix::sys::signal::Signal::SIGKILL)
        .unwrap());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !h.a.has_link("espip0"),
        "the TUN (and its routes) vanish with the process"
    );
    let routes = h.a.ip(&["route", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("10.4.2"),
        "no tunnel route left"
    );
    let mut again =
        Daemon::start(&h.a, &exe(), &h.dir.join("a.toml"), &h.dir.join("a2.log")).unwrap();
    assert!(h.a.has_link("espip0"));
    assert!(again.stop().unwrap());
}

/// Issue 12: a data-path thread that dies (here: a debug-build hook makes it panic at its
/// first packet) stops the daemon cleanly, non-zero, with the reason; nothing is left.
#[test]
fn a_dead_data_path_thread_stops_the_daemon_with_the_reason() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for thread in ["tx", "rx"] {
        let (a, b) = p2p::topology(&format!("dead{thread}")).unwrap();
        let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
        let dir =
            std::env::temp_dir().join(format!("espip-test-dead{thread}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mode = LabMode::Esp(Cipher::Aes128Gcm);
        let cfg_a = dir.join("a.toml");
        std::fs::write(
            &cfg_a,
            p2p::config_text(mode, true, Some(&keys), false, &dir.join("state-a"))
                .replace("[interface]\n", "[interface]\nforward = true\n"),
        )
        .unwrap();
        let cfg_b = dir.join("b.toml");
        std::fs::write(
            &cfg_b,
            p2p::config_text(mode, false, Some(&keys), false, &dir.join("state-b")),
        )
        .unwrap();
        // The hook is in A; B answers so that the RX thread gets a packet too.
        let _db = Daemon::start(&b, &exe(), &cfg_b, &dir.join("b.log")).unwrap();
        let mut da = Daemon::start_with_env(
            &a,
            &exe(),
            &cfg_a,
            &dir.join("a.log"),
            &[("ESPIP_DEBUG_PANIC", thread)],
        )
        .unwrap();
        let _ = netns::run(
            a.command("ping")
                .args(["-c", "2", "-i", "0.2", "-W", "1", "10.4.2.5"]),
        );
        let status = da.wait_exit(std::time::Duration::from_secs(5)).unwrap();
        let log = da.log();
        let status = status.unwrap_or_else(|| panic!("still running: {log}"));
        assert!(!status.success(), "{log}");
        assert!(
            log.contains(&format!("data-path thread espip-{thread} stopped: espip-{thread} panicked: ESPIP_DEBUG_PANIC={thread}")),
            "{log}"
        );
        assert!(
            log.contains("stopped; TUN device and its routes removed"),
            "{log}"
        );
        assert!(!a.has_link("espip0"), "TUN left behind");
        let fwd = netns::run(a.command("sysctl").args(["-n", "net.ipv4.ip_forward"])).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fwd.stdout).trim(),
            "0",
            "forwarding restored"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_second_daemon_on_the_same_interface_is_refused() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = half_lab("twice", Cipher::Aes128Gcm);
    let err = Daemon::start(
        &h.a,
        &exe(),
        &h.dir.join("a.toml"),
        &h.dir.join("second.log"),
    )
    .err()
    .expect("second daemon must not start");
    let msg = err.to_string();
    assert!(
        msg.contains("another espip is running for interface espip0"),
        "{msg}"
    );
    assert!(h.a.has_link("espip0"), "the first daemon is unharmed");
}

/// Issue 12 item 9: the default control socket belongs to the network namespace, so two
/// daemons with the same interface name in two namespaces both start, and `espip show` inside
/// each finds its own.
#[test]
fn default_control_sockets_are_per_network_namespace() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = p2p::topology("nsctl").unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-nsctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut daemons = Vec::new();
    for (ns, me_a, host) in [(&a, true, "a"), (&b, false, "b")] {
        let state = dir.join(format!("state-{host}"));
        let text = p2p::config_text(
            LabMode::Esp(Cipher::Aes128Gcm),
            me_a,
            Some(&keys),
            false,
            &state,
        )
        .replace(
            &format!("control = \"{}\"\n", state.join("control.sock").display()),
            "",
        );
        let cfg = dir.join(format!("{host}.toml"));
        std::fs::write(&cfg, text).unwrap();
        daemons.push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{host}.log"))).unwrap());
    }
    let mut sockets = Vec::new();
    for (ns, addr) in [(&a, "10.4.2.99/24"), (&b, "10.4.2.5/24")] {
        let out = netns::run(ns.command(exe()).args(["show", "--json"])).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st: espip::status::Status = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st.interface.addresses, vec![addr.to_string()]);
        let log = daemons[sockets.len()].log();
        let sock = log
            .split("control=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .to_string();
        assert!(sock.contains("/run/espip/netns-"), "{sock}");
        sockets.push(sock);
    }
    assert_ne!(sockets[0], sockets[1]);
    let ping = netns::run(
        a.command("ping")
            .args(["-c", "2", "-i", "0.2", "-W", "2", "10.4.2.5"]),
    )
    .unwrap();
    assert!(ping.status.success());
    for d in &mut daemons {
        assert!(d.stop().unwrap());
    }
    // The stopped (unprivileged) daemons could not remove their sockets from root's directory.
    for s in &sockets {
        if let Some(p) = Path::new(s).parent() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_lan_lab_50mb() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = lab_scenario(&["same-lan", "--megabytes", "50"]);
    for check in [
        "[PASS] HTTP A -> http://10.0.0.160/",
        "[PASS] HTTP B -> http://10.0.0.161/",
        "[PASS] TCP transfer 50 MB",
        "[PASS] LAN capture: only ESP and ARP",
        "[PASS] clean stop",
        "8 passed, 0 failed",
    ] {
        assert!(text.contains(check), "missing {check:?} in:\n{text}");
    }
}

fn same_lan_host(tag: &str) -> (Netns, Netns, PathBuf) {
    let a = Netns::new(tag, "a").unwrap();
    let b = Netns::new(tag, "b").unwrap();
    netns::veth(&a, "10.0.0.161/24", &b, "10.0.0.160/24", "lan0").unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.toml"),
        espip::lab::same_lan::config_text(true, Cipher::Aes128Gcm, &keys, &dir.join("state")),
    )
    .unwrap();
    (a, b, dir)
}

fn espip_rules(ns: &Netns) -> Vec<String> {
    let out = netns::run(&mut ns.command("iptables-save")).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.to_lowercase().contains("espip"))
        .map(String::from)
        .collect()
}

#[test]
fn rules_survive_sigkill_until_restart_and_user_rules_are_untouched() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, _b, dir) = same_lan_host("rules");
    let user_rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.77/32",
        "-j",
        "RETURN",
    ];
    netns::run_ok(a.command("iptables").args(user_rule)).unwrap();
    let cfg = dir.join("a.toml");
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("1.log")).unwrap();
    let installed = espip_rules(&a);
    assert!(installed.len() >= 7, "{installed:?}");
    // SIGKILL: the TUN and its routes go with the process, the rules stay...
    d.stop_with(nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!a.has_link("espip0"));
    assert_eq!(
        espip_rules(&a),
        installed,
        "netfilter rules outlive a SIGKILL"
    );
    // ...until the next start, which removes them before installing its own (no duplicates).
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("2.log")).unwrap();
    assert_eq!(
        espip_rules(&a),
        installed,
        "restart replaced the stale rules, no duplicates"
    );
    assert!(d.stop().unwrap());
    assert!(espip_rules(&a).is_empty(), "stop removes every espip rule");
    assert!(!a.has_link("espip0"));
    let save =
        String::from_utf8_lossy(&netns::run(&mut a.command("iptables-save")).unwrap().stdout)
            .into_owned();
    assert!(
        save.contains("-A OUTPUT -d 192.0.2.77/32 -j RETURN"),
        "the user's rule survives:\n{save}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_same_lan_setups_get_clear_errors() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, _b, dir) = same_lan_host("wrong");
    let cfg = dir.join("a.toml");
    // The alias prefix is on-link.
    a.ip(&["addr", "add", "10.0.1.5/24", "dev", "lan0"])
        .unwrap();
    let e = Daemon::start(&a, &exe(), &cfg, &dir.join("onlink.log"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("alias 10.0.1.0/24 is on-link") && e.contains("lan0"),
        "{e}"
    );
    a.ip(&["addr", "del", "10.0.1.5/24", "dev", "lan0"])
        .unwrap();
    // No iptables on PATH: the error names the package, and nothing is left behind.
    let log = dir.join("noipt.log");
    let out = netns::run(
        a.command("/usr/bin/env")
            .arg("PATH=/nonexistent")
            .arg(exe())
            .args(["run", "--config"])
            .arg(&cfg),
    )
    .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("apt-get install iptables"),
        "{msg}"
    );
    assert!(!a.has_link("espip0"));
    assert!(espip_rules(&a).is_empty());
    let _ = (log, std::fs::remove_dir_all(&dir));
}

/// A restarted sender with the same keys must continue after every sequence number it may have
/// used (no nonce reuse), so its peer's replay window accepts it at once.
#[test]
fn restart_with_the_same_keys_resumes_without_reusing_sequence_numbers() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = p2p::topology("restart").unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mode = LabMode::Esp(Cipher::Aes128Gcm);
    let (cfg_a, cfg_b) = (dir.join("a.toml"), dir.join("b.toml"));
    let state_a = dir.join("state-a");
    std::fs::write(
        &cfg_a,
        p2p::config_text(mode, true, Some(&keys), false, &state_a),
    )
    .unwrap();
    std::fs::write(
        &cfg_b,
        p2p::config_text(mode, false, Some(&keys), false, &dir.join("state-b")),
    )
    .unwrap();
    let ping = |ns: &Netns| {
        netns::run(
            ns.command("ping")
                .args(["-c", "3", "-i", "0.2", "-W", "2", "10.4.2.5"]),
        )
        .unwrap()
        .status
        .success()
    };
    // The reservation as the daemon will read it back (the file's newest valid slot).
    let saved = || -> u64 {
        espip::sys::seqstore::peek(&state_a, &keys.a_to_b.fingerprint())
            .unwrap()
            .unwrap()
    };
    let mut db = Daemon::start(&b, &exe(), &cfg_b, &dir.join("b.log")).unwrap();
    let mut da = Daemon::start(&a, &exe(), &cfg_a, &dir.join("a1.log")).unwrap();
    assert!(ping(&a));
    assert_eq!(
        saved(),
        espip::sys::seqstore::RESERVE,
        "a block is reserved before sending"
    );
    // Crash: the restart resumes after the whole reserved block.
    da.stop_with(nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut da = Daemon::start(&a, &exe(), &cfg_a, &dir.join("a2.log")).unwrap();
    assert!(
        da.log().contains("resumes after its saved sequence number"),
        "{}",
        da.log()
    );
    let t = std::time::Instant::now();
    assert!(ping(&a), "traffic resumes after a crash with the same keys");
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    // Clean stop records the last number actually sent; the next start continues right after.
    assert!(da.stop().unwrap());
    let last = saved();
    assert!(
        last > espip::sys::seqstore::RESERVE && last < espip::sys::seqstore::RESERVE + 100,
        "{last}"
    );
    let mut da = Daemon::start(&a, &exe(), &cfg_a, &dir.join("a3.log")).unwrap();
    assert!(ping(&a));
    assert!(da.stop().unwrap());
    assert!(db.stop().unwrap());
    let log_b = db.log();
    assert!(
        log_b.contains("drops=no_route=1") || !log_b.contains("replay="),
        "B never saw a replayed number: {log_b}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gateway_lab_and_its_diagnosis() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let run = |extra: &[&str]| {
        let out = Command::new(exe())
            .args(["lab", "gateway", "--no-install"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = run(&[]);
    assert!(ok && text.contains("6 passed, 0 failed"), "{text}");
    assert!(text.contains("V's access log: 10.4.2.99"), "{text}");
    // The article's author's setup: no forwarding on the server. The lab fails and says why.
    let (ok, text) = run(&["--without-forward"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "the server does not forward: net.ipv4.ip_forward=0 (set interface.forward = true)"
        ),
        "{text}"
    );
}

#[test]
fn upstream_lab() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = lab_scenario(&["upstream"]);
    assert!(text.contains("6 passed, 0 failed"), "{text}");
    assert!(
        text.contains("10.0.2.244 \"GET / HTTP/1.1\"")
            && text.contains("rule dropped")
            && !text.contains("rule dropped 0 packets"),
        "{text}"
    );
    assert!(text.contains("received 0; RB received"), "{text}");
}

#[test]
fn hub_lab() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = lab_scenario(&["hub"]);
    assert!(text.contains("6 passed, 0 failed"), "{text}");
    assert!(text.contains("H's kernel forwarded 0 datagrams"), "{text}");
}

#[test]
fn metrics_and_control_socket() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = half_lab_with(
        "metrics",
        Cipher::Aes128Gcm,
        "\n[metrics]\nlisten = \"127.0.0.1:9587\"\n",
    );
    // After setup the daemon is its own system user `espip` (created on demand; not the shared
    // `nobody`) with CAP_NET_ADMIN and CAP_NET_RAW only, on every thread, and cannot regain
    // privileges.
    let espip_uid = nix::unistd::User::from_name("espip")
        .unwrap()
        .expect("the daemon created its user")
        .uid
        .as_raw();
    let pid = h.daemon.pid().unwrap();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(
            field("Uid:"),
            format!("{espip_uid} {espip_uid} {espip_uid} {espip_uid}"),
            "{status}"
        );
        for caps in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"] {
            assert_eq!(field(caps), "0000000000003000", "{caps} {status}");
        }
        assert_eq!(field("NoNewPrivs:"), "1");
    }
    // Root-only control socket.
    use std::os::unix::fs::PermissionsExt;
    let sock = h.dir.join("state/control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let show = Command::new(exe())
        .args(["show", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("peer: b") && text.contains("sa out: spi 0x00001001"),
        "{text}"
    );
    assert!(
        !text.contains(h.keys.a_to_b.to_hex().as_str()),
        "no key in show"
    );
    // The metrics, parsed by the Prometheus project's own Python parser.
    let get = |path: &str| {
        let out = netns::run(h.a.command("curl").args([
            "-s",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:9587{path}"),
        ]))
        .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let body = get("/metrics");
    assert!(body.ends_with("\n200"), "{body}");
    assert!(get("/other").ends_with("404"));
    let parse = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\nfor fam in f(sys.stdin.read()):\n  for s in fam.samples:\n    print(fam.type, s.name, s.labels.get('reason', ''), s.value)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    parse
        .stdin
        .as_ref()
        .unwrap()
        .write_all(body.trim_end_matches("200").as_bytes())
        .unwrap();
    let out = parse.wait_with_output().unwrap();
    let parsed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prometheus_client refused the metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "counter espip_peer_packets_total  0.0",
        "counter espip_drops_total bad_icv 0.0",
        "counter espip_drops_total replay 0.0",
        "gauge espip_mtu_bytes  1446.0",
    ] {
        assert!(parsed.contains(line), "{line:?} missing in:\n{parsed}");
    }
    assert!(
        !body.contains(h.keys.a_to_b.to_hex().as_str()),
        "no key in metrics"
    );
    drop(h);
}

/// The `espip show --json` snapshot of a half lab's daemon.
fn status(h: &HalfLab) -> espip::status::Status {
    status_at(&h.dir.join("state/control.sock"))
}

/// The `espip show --json` snapshot of the daemon at `socket`.
fn status_at(socket: &Path) -> espip::status::Status {
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

#[test]
fn hostile_packets_are_dropped_with_the_right_counter_and_never_answered() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cipher = Cipher::Aes128Gcm;
    let mut h = half_lab("hostile", cipher);
    let before = status(&h);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/hostile.py");
    let out = netns::run(
        h.b.command("/usr/bin/python3")
            .arg(&script)
            .args(["--cipher", cipher.name()])
            .args(["--key-a-to-b", h.keys.a_to_b.to_hex().as_str()])
            .args(["--key-b-to-a", h.keys.b_to_a.to_hex().as_str()])
            .args(["--spi-a-to-b", &format!("{SPI_A_TO_B:#x}")])
            .args(["--spi-b-to-a", &format!("{SPI_B_TO_A:#x}")])
            .args([
                "--window",
                &espip::config::DEFAULT_REPLAY_WINDOW.to_string(),
            ]),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "hostile.py failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("hostile.py: {stdout}");
    let after = status(&h);
    // Every valid echo request (reordered, after the window moved, with outer options, as
    // outer fragments, at the end) got exactly one reply; nothing else came back.
    assert_eq!(r["replies"], r["valid"], "{stdout}");
    assert_eq!(
        r["other"],
        serde_json::json!([]),
        "espip answered: {stdout}"
    );
    let delivered = r["expected"]["delivered"].as_u64().unwrap();
    assert_eq!(
        after.peers[0].rx_packets - before.peers[0].rx_packets,
        delivered,
        "delivered to the TUN: {stdout}"
    );
    for reason in [
        "replay",
        "bad_icv",
        "unknown_spi",
        "malformed",
        "wrong_source",
        "not_allowed",
        "bad_padding",
        "bad_next_header",
        "unknown_peer",
        "lifetime_expired",
    ] {
        let want = r["expected"]["drops"][reason].as_u64().unwrap_or(0);
        let got = after.drops[reason] - before.drops[reason];
        assert_eq!(got, want, "{reason}: {:?}\n{stdout}", after.drops);
    }
    assert_eq!(after.errors["bad_outer"], 0);
    assert!(
        h.daemon.stop().unwrap(),
        "clean stop after the hostile packets"
    );
}

/// Both hosts of the p2p lab with a daemon each (esp), from the lab's own configs;
/// `b_interface` is added to B's `[interface]`.
struct FullPair {
    a: Netns,
    b: Netns,
    daemons: Vec<Daemon>,
    dir: PathBuf,
}

impl Drop for FullPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn full_pair(tag: &str, cipher: Cipher, b_interface: &str) -> FullPair {
    full_pair_edit(tag, LabMode::Esp(cipher), cipher, |me_a, t| {
        if me_a {
            t
        } else {
            t.replace("[interface]\n", &format!("[interface]\n{b_interface}"))
        }
    })
}

/// Both hosts of the p2p lab in `mode`, each configuration text passed through `edit(me_a, text)`.
fn full_pair_edit(
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

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_30_second_garbage_flood_does_not_stop_a_transfer() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const BYTES: u64 = 20_000_000;
    const FLOOD_SECONDS: u64 = 30;
    let mut pair = full_pair("flood", Cipher::Aes128Gcm, "");
    let (a, b, dir) = (&pair.a, &pair.b, pair.dir.clone());
    let a_pid = pair.daemons[0].pid().unwrap();
    let transfer = || espip::lab::transfer(&exe(), (b, a), p2p::A_INNER, BYTES).unwrap();
    // Baseline: B -> A, so that A's receive path carries the data and meets the flood.
    let base = transfer();
    assert!(base.ok(BYTES), "baseline transfer: {base:?}");
    let rss_before = rss_kb(a_pid);
    let flood = b
        .command(exe())
        .args(["lab-tool", "flood", "--dst", p2p::A_OUTER])
        .args(["--spi", &format!("{SPI_B_TO_A:#x}")])
        .args(["--seconds", &FLOOD_SECONDS.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let (mut rates, mut rss) = (Vec::new(), Vec::new());
    std::thread::sleep(std::time::Duration::from_millis(500));
    while started.elapsed().as_secs() + 4 < FLOOD_SECONDS {
        let r = transfer();
        assert!(r.ok(BYTES), "transfer during the flood: {r:?}");
        rates.push(r.mbit_s());
        rss.push(rss_kb(a_pid));
    }
    let sent = flood.wait_with_output().unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout).to_string();
    assert!(
        pair.daemons[0].pid().is_some_and(|p| rss_kb(p) > 0),
        "A is up"
    );
    let (ok, _) = p2p::ping(a, p2p::B_INNER);
    assert!(ok, "the tunnel works after the flood");
    let st = status_at(&dir.join("state-a/control.sock"));
    rates.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let median = rates[rates.len() / 2];
    let (lo, hi) = (
        *rss.iter().min().unwrap(),
        *rss.iter().max().unwrap().max(&rss_before),
    );
    eprintln!(
        "flood: sent {sent}; espip counted bad_icv {} unknown_spi {} unknown_peer {} malformed {}; \
         transfers during the flood {} at median {median:.0} Mbit/s vs {:.0} before (ratio {:.2}); \
         A's RSS {rss_before} kB before, {lo}-{hi} kB during",
        st.drops["bad_icv"],
        st.drops["unknown_spi"],
        st.drops["unknown_peer"],
        st.drops["malformed"],
        rates.len(),
        base.mbit_s(),
        median / base.mbit_s()
    );
    assert!(
        rates.len() >= 2,
        "at least two transfers completed during the flood"
    );
    // An ESP-only daemon opens no IP-in-IP socket: that part of the flood never reaches it
    // (the kernel drops it), so unknown_peer stays 0.
    for r in ["bad_icv", "unknown_spi", "malformed"] {
        assert!(st.drops[r] > 1000, "{r} counted: {:?}", st.drops);
    }
    assert!(
        hi - lo.min(rss_before) < 2048,
        "RSS flat: {rss_before} kB, {rss:?}"
    );
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap(), "clean stop after the flood");
    }
}

#[test]
fn an_unknown_user_is_refused_before_anything_is_set_up() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, _b) = p2p::topology("nouser").unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-nouser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let text = p2p::config_text(
        LabMode::Esp(Cipher::Aes128Gcm),
        true,
        Some(&keys),
        false,
        &dir.join("state"),
    )
    .replace(
        "[interface]\n",
        "[interface]\nuser = \"no-such-user-espip\"\n",
    );
    let cfg = dir.join("a.toml");
    std::fs::write(&cfg, text).unwrap();
    let err = Daemon::start(&a, &exe(), &cfg, &dir.join("a.log"))
        .err()
        .expect("must not start");
    let log = std::fs::read_to_string(dir.join("a.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.contains("interface.user \"no-such-user-espip\"") && log.contains("useradd"),
        "{err}: {log}"
    );
    assert!(!a.has_link("espip0"), "nothing set up");
}

#[test]
fn a_full_capture_disk_drops_capture_records_not_packets() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A 1 MB tmpfs as the capture directory: full after a few hundred packets.
    let disk =
        std::env::temp_dir().join(format!("espip-test-fulldisk-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&disk).unwrap();
    // The daemon writes captures as its user after setup and never takes over a directory it
    // did not create: the disk is mounted for that user, as an admin would.
    let user = espip::sys::privdrop::lookup_or_create("espip").unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!(
            "size=1m,mode=0700,uid={},gid={}",
            user.uid, user.gid
        ))
        .arg("tmpfs")
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unmount = Unmount(disk.clone());
    let mut h = half_lab_with(
        "fulldisk",
        Cipher::Aes128Gcm,
        &format!(
            "\n[capture]\ndir = \"{}\"\nmax_file_mb = 100\nfiles = 1\n",
            disk.display()
        ),
    );
    // 1000 x 1400-byte UDP datagrams towards B (no daemon there: sent, not answered):
    // 1000 inner + 1000 outer records of ~1.5 KB, three times what the disk holds.
    let out = netns::run(h.a.command("/usr/bin/python3").args([
        "-c",
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(1000):\n    s.sendto(bytes(1400), ('10.4.2.5', 9))\n    time.sleep(0.0005)\nprint('sent 1000')",
    ]))
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sent 1000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let st = status(&h);
    let c = st.capture.clone().unwrap();
    assert_eq!(
        st.peers[0].tx_packets, 1000,
        "every packet went out: {st:?}"
    );
    // Every record is accounted for: written, or lost to the full disk (most of them).
    assert!(
        c.written > 0 && c.written + c.write_errors + c.dropped >= 2000,
        "{c:?}"
    );
    assert!(c.write_errors > 1000, "the full disk lost records: {c:?}");
    // What was written before the disk filled is still there (a reopen appends).
    let on_disk: u64 = ["espip0-inner.pcap", "espip0-outer.pcap"]
        .iter()
        .map(|f| std::fs::metadata(disk.join(f)).map_or(0, |m| m.len()))
        .sum();
    assert!(
        on_disk > 900_000,
        "the capture files fill the disk: {on_disk} bytes"
    );
    assert!(
        h.daemon.log().contains("writing the capture failed"),
        "warned"
    );
    assert!(
        h.daemon.stop().unwrap(),
        "clean stop with a full capture disk"
    );
}

#[test]
fn offload_on_one_side_and_off_on_the_other_interoperate() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = full_pair("offl", Cipher::Aes128Gcm, "offload = false\n");
    let (a, b) = (&pair.a, &pair.b);
    // Both directions: A segments its TSO packets, B (no offload) reads packet by packet; B's
    // TCP segments reach A, which coalesces them.
    for (from, to, addr) in [(a, b, p2p::B_INNER), (b, a, p2p::A_INNER)] {
        let r = espip::lab::transfer(&exe(), (from, to), addr, 20_000_000).unwrap();
        assert!(r.ok(20_000_000), "{r:?}");
    }
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

#[test]
fn tso_and_uso_packets_from_the_tun_are_segmented_and_gro_coalesces() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = full_pair("uso", Cipher::Aes128Gcm, "");
    // B counts the datagrams it receives; A sends 5 x 12000 bytes with UDP_SEGMENT = 1200, so
    // its kernel hands the TUN five 12 KB UDP packets (USO) that espip must cut into 50.
    let recv = pair
        .b
        .command("/usr/bin/python3")
        .args([
            "-c",
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('10.4.2.5', 5555))\ns.settimeout(3)\nsizes = []\ntry:\n    while len(sizes) < 50:\n        sizes.append(len(s.recv(65535)))\nexcept socket.timeout:\n    pass\nprint(len(sizes), sorted(set(sizes)))",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = netns::run(pair.a.command("/usr/bin/python3").args([
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.setsockopt(17, 103, 1200)\nfor i in range(5):\n    s.sendto(bytes(12000), ('10.4.2.5', 5555))\nprint('sent')",
    ]))
    .unwrap();
    assert!(
        String::from_utf8_lossy(&sent.stdout).contains("sent"),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let got = recv.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&got.stdout).trim().to_string();
    assert_eq!(got, "50 [1200]", "B received every 1200-byte datagram");
    // A TCP transfer: A's kernel hands over TSO packets, B coalesces the segments it writes.
    let r = espip::lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 5_000_000).unwrap();
    assert!(r.ok(5_000_000), "{r:?}");
    let a = status_at(&pair.dir.join("state-a/control.sock"));
    let b = status_at(&pair.dir.join("state-b/control.sock"));
    assert!(
        a.offload["uso_in"] >= 5,
        "USO packets segmented: {:?}",
        a.offload
    );
    assert!(
        a.offload["tso_in"] > 0,
        "TSO packets segmented: {:?}",
        a.offload
    );
    assert!(
        b.offload["gro_out"] > 0,
        "coalesced writes: {:?}",
        b.offload
    );
    assert_eq!(a.errors["offload"], 0);
}

/// ESP in UDP on other ports than 4500 (B listens on 14500): 20 MB each way arrive intact, the
/// senders' TSO reads leave as UDP GSO trains and the receivers take them coalesced (UDP GRO).
#[test]
fn esp_in_udp_moves_trains_of_datagrams_both_ways() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mode = LabMode::EspUdp(Cipher::Aes128Gcm);
    let mut pair = full_pair_edit("udpgso", mode, Cipher::Aes128Gcm, |me_a, t| {
        if me_a {
            t.replace(
                &format!("endpoint = \"{}\"", p2p::B_OUTER),
                &format!("endpoint = \"{}:14500\"", p2p::B_OUTER),
            )
        } else {
            t.replace("[interface]\n", "[interface]\nlisten_port = 14500\n")
        }
    });
    for (from, to, addr) in [
        (&pair.a, &pair.b, p2p::B_INNER),
        (&pair.b, &pair.a, p2p::A_INNER),
    ] {
        let r = espip::lab::transfer(&exe(), (from, to), addr, 20_000_000).unwrap();
        assert!(r.ok(20_000_000), "{r:?}");
    }
    let a = status_at(&pair.dir.join("state-a/control.sock"));
    let b = status_at(&pair.dir.join("state-b/control.sock"));
    assert_eq!(a.peers[0].endpoint, format!("{}:14500", p2p::B_OUTER));
    assert_eq!(b.peers[0].endpoint, format!("{}:4500", p2p::A_OUTER));
    for (st, host) in [(&a, "A"), (&b, "B")] {
        assert_eq!(st.peers[0].mode, "esp-udp");
        assert!(
            st.offload["udp_gso_out"] > 0,
            "{host} sent trains: {:?}",
            st.offload
        );
        assert!(
            st.offload["udp_gro_in"] > 0,
            "{host} received trains: {:?}",
            st.offload
        );
        assert!(st.peers[0].rx_packets > 10_000, "{host}: {:?}", st.peers[0]);
        assert_eq!(st.errors["send"], 0, "{host}: {:?}", st.errors);
        assert_eq!(st.errors["bad_outer"], 0, "{host}: {:?}", st.errors);
        for (reason, n) in &st.drops {
            if reason != "no_route" {
                assert_eq!(*n, 0, "{host} dropped {reason}: {:?}", st.drops);
            }
        }
    }
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

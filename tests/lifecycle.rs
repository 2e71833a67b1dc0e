//! Namespace tests: Start, stop and restart: SIGKILL leaves nothing, a killed lab takes its daemons, a second daemon is refused, a dead data-path thread stops the daemon, per-namespace control sockets, sequence numbers across restarts, an unknown user, a full capture disk.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

#[test]
fn sigkill_leaves_nothing_and_restart_works() {
    let Some(_g) = serial() else { return };
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

/// A lab killed while it runs (SIGTERM or SIGKILL: neither reaches its teardown) takes its
/// daemons with it, also after they dropped to their user (the kernel clears the parent-death
/// signal on that change; espip sets it again), and the next lab removes its namespaces.
#[test]
fn a_killed_lab_takes_its_daemons_and_the_next_lab_its_namespaces() {
    use std::time::{Duration, Instant};
    let Some(_g) = serial() else { return };
    let mut lab = Command::new(exe())
        .args(["lab", "p2p"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let work = format!("espip-lab-p2p-{}", lab.id());
    let daemons = || -> Vec<u32> {
        let out = Command::new("pgrep")
            .args(["-f", &format!(" run --config .*{work}/")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemons().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the p2p lab started no two daemons in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past their setup: dropped to their user.
    std::thread::sleep(Duration::from_secs(1));
    for pid in daemons() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert!(
            !uid.contains("\t0\t"),
            "the daemon {pid} dropped root: {uid}"
        );
    }
    let pid = lab.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    lab.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemons().is_empty() {
        let left = daemons();
        if Instant::now() > deadline {
            for p in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            netns::remove_stale();
            panic!("daemons {left:?} outlived their lab by 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let removed = netns::remove_stale();
    assert!(
        removed.iter().any(|n| n.contains(&format!("-{pid}-"))),
        "the lab's namespaces are removed by the next start: {removed:?}"
    );
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&work));
}

/// Issue 12: a data-path thread that dies (here: a debug-build hook makes it panic at its
/// first packet) stops the daemon cleanly, non-zero, with the reason; nothing is left.
#[test]
fn a_dead_data_path_thread_stops_the_daemon_with_the_reason() {
    let Some(_g) = serial() else { return };
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
    let Some(_g) = serial() else { return };
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
    let Some(_g) = serial() else { return };
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

/// A restarted sender with the same keys must continue after every sequence number it may have
/// used (no nonce reuse), so its peer's replay window accepts it at once.
#[test]
fn restart_with_the_same_keys_resumes_without_reusing_sequence_numbers() {
    let Some(_g) = serial() else { return };
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
fn an_unknown_user_is_refused_before_anything_is_set_up() {
    let Some(_g) = serial() else { return };
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

/// Per-path `local` and `device` (issue 29), checked on the host the daemon starts on: a
/// `local` this host does not have is refused before anything is set up, naming the path and
/// the fix; a `device` that does not exist (an LTE stick not plugged in) is a warning, the
/// daemon runs and shows the path down with its resolved interfaces.
#[test]
fn a_path_local_not_on_this_host_is_refused_and_a_missing_device_is_a_warning() {
    let Some(_g) = serial() else { return };
    let (a, _b) = p2p::topology("pathloc").unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-pathloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let base = p2p::config_text(
        LabMode::EspUdp(Cipher::Aes128Gcm),
        true,
        Some(&keys),
        false,
        &dir.join("state"),
    )
    .replace(&format!("endpoint = \"{}\"\n", p2p::B_OUTER), "")
    .replace(&format!("local = \"{}\"\n", p2p::A_OUTER), "");
    let with_paths = |second: &str| {
        format!(
            "{base}\n[[peer.path]]\nname = \"dsl\"\nendpoint = \"{b}:4500\"\nlocal = \"{a_out}\"\n\n[[peer.path]]\nname = \"lte\"\nendpoint = \"{b}:4500\"\n{second}\n",
            b = p2p::B_OUTER,
            a_out = p2p::A_OUTER,
        )
    };
    let cfg = dir.join("a.toml");
    std::fs::write(&cfg, with_paths("local = \"192.0.2.77\"")).unwrap();
    let err = Daemon::start(&a, &exe(), &cfg, &dir.join("a.log"))
        .err()
        .expect("must not start");
    let log = std::fs::read_to_string(dir.join("a.log")).unwrap_or_default();
    assert!(
        log.contains("path \"lte\": local 192.0.2.77 is not an address of this host")
            && log.contains("leave local out"),
        "{err}: {log}"
    );
    assert!(!a.has_link("espip0"), "nothing set up");

    std::fs::write(&cfg, with_paths("device = \"wwan9\"")).unwrap();
    let d = Daemon::start(&a, &exe(), &cfg, &dir.join("a2.log")).expect("starts");
    let st = status_at(&dir.join("state").join("control.sock"));
    let paths = st.peers[0].multipath.as_ref().unwrap().paths.clone();
    drop(d);
    let log = std::fs::read_to_string(dir.join("a2.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.contains("path \"lte\": device \"wwan9\" does not exist (yet)"),
        "{log}"
    );
    assert_eq!(paths[0].local.as_deref(), Some(p2p::A_OUTER));
    assert_eq!(
        paths[0].device.as_deref(),
        Some("veth0"),
        "found from local"
    );
    assert_eq!(paths[1].device.as_deref(), Some("wwan9"));
}

#[test]
fn a_full_capture_disk_drops_capture_records_not_packets() {
    let Some(_g) = serial() else { return };
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

/// `espip reload` while a transfer to peer b runs: a peer c is added (its route appears),
/// changed (new keys, new prefix), a change only a restart can make is refused, and c is
/// removed again (its route goes) - for as long as the transfer lasts. The daemon has dropped
/// to its own user, so the reload goes the way systemd's ExecReload takes it: root reads the
/// files and passes them, with the key state files, over the control socket. The transfer's
/// hash is equal and neither end counts a drop of b's traffic; b's SA is never restarted.
#[test]
fn reload_adds_changes_and_removes_a_peer_while_a_transfer_runs() {
    let Some(_g) = serial() else { return };
    const BYTES: u64 = 300_000_000;
    let pair = full_pair("reload", Cipher::Aes128Gcm, "");
    let (a, b, dir) = (&pair.a, &pair.b, pair.dir.clone());
    let cfg = dir.join("a.toml");
    let base = std::fs::read_to_string(&cfg).unwrap();
    let key = || {
        espip::sys::random_key(Cipher::Aes128Gcm)
            .unwrap()
            .to_hex()
            .to_string()
    };
    let peer_c = |prefix: &str, spi: u32| {
        format!(
            "\n[[peer]]\nname = \"c\"\nendpoint = \"192.0.2.77\"\nallowed_ips = [\"{prefix}\"]\nmode = \"esp\"\ncipher = \"aes-128-gcm\"\nspi_out = \"{spi:#010x}\"\nspi_in = \"{:#010x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\n",
            spi + 1,
            key(),
            key()
        )
    };
    let reload = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        let o = a
            .command(exe())
            .args(["reload", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let routes = || String::from_utf8_lossy(&a.ip(&["route", "show"]).unwrap().stdout).to_string();
    let sock_a = dir.join("state-a/control.sock");
    let sock_b = dir.join("state-b/control.sock");
    let mut cycles = 0;
    let result = std::thread::scope(|s| {
        let t = s.spawn(|| espip_lab::transfer(&exe(), (a, b), p2p::B_INNER, BYTES).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(500));
        let seq_before = status_at(&sock_a).peers[0]
            .sa_out
            .as_ref()
            .unwrap()
            .next_seq;
        assert!(seq_before > 1, "the transfer is under way");
        while !t.is_finished() || cycles == 0 {
            let (ok, out) = reload(&(base.clone() + &peer_c("10.4.9.0/24", 0x3001)));
            assert!(ok, "add c: {out}");
            assert!(out.contains("added [\"c\"]"), "{out}");
            assert!(routes().contains("10.4.9.0/24 dev espip0"), "{}", routes());
            assert_eq!(status_at(&sock_a).peers.len(), 2);

            let (ok, out) = reload(&(base.clone() + &peer_c("10.4.10.0/24", 0x3101)));
            assert!(ok, "change c: {out}");
            assert!(out.contains("changed [\"c\"]"), "{out}");
            let r = routes();
            assert!(
                !r.contains("10.4.9.0/24") && r.contains("10.4.10.0/24"),
                "{r}"
            );

            let mtu = base.replace("[interface]\n", "[interface]\nmtu = 1300\n");
            let (ok, out) = reload(&mtu);
            assert!(!ok, "an [interface] change needs a restart: {out}");
            assert!(
                out.contains("[interface] key (mtu) changed") && out.contains("restart"),
                "{out}"
            );
            assert_eq!(status_at(&sock_a).peers.len(), 2, "refused: c still there");

            let (ok, out) = reload(&base);
            assert!(ok, "remove c: {out}");
            assert!(out.contains("removed [\"c\"]"), "{out}");
            assert!(!routes().contains("10.4.10.0/24"), "{}", routes());
            cycles += 1;
            if cycles == 1 {
                assert!(
                    !t.is_finished(),
                    "the transfer outlasts a whole add/change/refuse/remove cycle (make it longer)"
                );
            }
        }
        let r = t.join().unwrap();
        let after = status_at(&sock_a);
        assert!(
            after.peers[0].sa_out.as_ref().unwrap().next_seq > seq_before,
            "b's outbound SA continued (never restarted at 1)"
        );
        assert_eq!(
            after.interface.generation,
            1 + 3 * cycles,
            "three applied reloads per cycle, the refused one not counted"
        );
        r
    });
    assert!(
        result.ok(BYTES),
        "transfer across {cycles} reload cycles: {result:?}"
    );
    let (sa, sb) = (status_at(&sock_a), status_at(&sock_b));
    for (who, st) in [("A", &sa), ("B", &sb)] {
        for r in [
            "replay",
            "unknown_spi",
            "bad_icv",
            "wrong_source",
            "malformed",
            "seq_unreserved",
            "lifetime_expired",
        ] {
            assert_eq!(st.drops[r], 0, "{who} dropped {r}: {:?}", st.drops);
        }
        assert_eq!(st.errors["send"], 0, "{who} send errors");
    }
    eprintln!(
        "reload: {cycles} cycles of 4 reloads during a {BYTES}-byte transfer at {:.0} Mbit/s; drops A {:?} B {:?}",
        result.mbit_s(),
        sa.drops.iter().filter(|(_, n)| **n > 0).collect::<Vec<_>>(),
        sb.drops.iter().filter(|(_, n)| **n > 0).collect::<Vec<_>>()
    );
    // A peer over IPv6 needs sockets the daemon did not open at start: refused, named.
    let v6 = base.clone() + &peer_c("10.4.9.0/24", 0x3201).replace("192.0.2.77", "2001:db8::77");
    let (ok, out) = reload(&v6);
    assert!(
        !ok && out.contains("over IPv6") && out.contains("restart"),
        "{out}"
    );
    let log = std::fs::read_to_string(dir.join("a.log")).unwrap();
    assert!(log.contains("configuration reloaded"), "{log}");
}

/// Issue 32: `post_up` runs as root after the setup with `%i` expanded and its output logged;
/// `pre_down` runs as root at a clean stop (the daemon has dropped to its user by then) and
/// after a SIGKILL; a failing `post_up` stops the start and leaves nothing behind.
#[test]
fn post_up_and_pre_down_hooks_run_as_root_and_a_failing_post_up_undoes_the_start() {
    let Some(_g) = serial() else { return };
    let (a, _b) = p2p::topology("hooks").unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let base = p2p::config_text(
        LabMode::Esp(Cipher::Aes128Gcm),
        true,
        Some(&keys),
        false,
        &dir.join("state"),
    );
    let (up, down) = (dir.join("up"), dir.join("down"));
    let with = |post_up: &str| {
        let text = base.replace(
            "[interface]\n",
            &format!(
                "[interface]\npost_up = [{post_up}]\npre_down = [\"echo down-%i $(id -u) > {}\"]\n",
                down.display()
            ),
        );
        let cfg = dir.join("a.toml");
        std::fs::write(&cfg, text).unwrap();
        std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        cfg
    };
    let cfg = with(&format!(
        "\"ip addr add 10.99.0.1/32 dev %i\", \"echo up-%i $(id -u) > {}; echo hello from post_up\"",
        up.display()
    ));
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("1.log")).unwrap();
    assert_eq!(std::fs::read_to_string(&up).unwrap().trim(), "up-espip0 0");
    let addrs = a.ip(&["-o", "addr", "show", "dev", "espip0"]).unwrap();
    assert!(
        String::from_utf8_lossy(&addrs.stdout).contains("10.99.0.1/32"),
        "{}",
        String::from_utf8_lossy(&addrs.stdout)
    );
    assert!(d.log().contains("hello from post_up"), "{}", d.log());
    assert!(!down.exists());
    d.stop().unwrap();
    assert_eq!(
        std::fs::read_to_string(&down).unwrap().trim(),
        "down-espip0 0",
        "pre_down ran as root at the stop"
    );
    // After a SIGKILL, pre_down runs too.
    std::fs::remove_file(&down).unwrap();
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("2.log")).unwrap();
    d.stop_with(nix::sys::signal::Signal::SIGKILL).unwrap();
    let start = std::time::Instant::now();
    while !down.exists() && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(down.exists(), "pre_down after SIGKILL");
    // A failing post_up: the start fails, names it, and leaves nothing.
    let cfg = with("\"echo first\", \"exit 3\"");
    let err = Daemon::start(&a, &exe(), &cfg, &dir.join("3.log"))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("post_up[1]") && err.contains("exit 3"),
        "{err}"
    );
    assert!(!a.has_link("espip0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

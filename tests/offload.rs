//! Namespace tests: TUN offloads and UDP GSO/GRO: mixed offload settings interoperate, TSO/USO packets are segmented and GRO coalesces, ESP-in-UDP trains move both ways; the raw modes' AF_PACKET fast path and AF_XDP receive path; IP-in-IP that the receiver's GRO merged is cut back (and refused when it is for another host).
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

#[test]
fn offload_on_one_side_and_off_on_the_other_interoperate() {
    let Some(_g) = serial() else { return };
    let mut pair = full_pair("offl", Cipher::Aes128Gcm, "offload = false\n");
    let (a, b) = (&pair.a, &pair.b);
    // Both directions: A segments its TSO packets, B (no offload) reads packet by packet; B's
    // TCP segments reach A, which coalesces them.
    for (from, to, addr) in [(a, b, p2p::B_INNER), (b, a, p2p::A_INNER)] {
        let r = espip_lab::transfer(&exe(), (from, to), addr, 20_000_000).unwrap();
        assert!(r.ok(20_000_000), "{r:?}");
    }
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

#[test]
fn tso_and_uso_packets_from_the_tun_are_segmented_and_gro_coalesces() {
    let Some(_g) = serial() else { return };
    let pair = full_pair("uso", Cipher::Aes128Gcm, "");
    // B counts the datagrams it receives; A sends 5 x 12000 bytes with UDP_SEGMENT = 1200, so
    // its kernel hands the TUN five 12 KB UDP packets (USO) that espip must cut into 50. B's
    // espip receives them in trains and writes each train to its TUN as one UDP GSO packet
    // (UDP GRO), which B's kernel cuts again: the same 50 datagrams, in order, byte for byte.
    fifty_datagrams_arrive(&pair, false);
    let b = status_at(&pair.dir.join("state-b/control.sock"));
    assert!(
        b.offload["gro_out"] > 0,
        "the datagrams were written coalesced (UDP GRO): {:?}",
        b.offload
    );
    // A TCP transfer: A's kernel hands over TSO packets, B coalesces the segments it writes.
    let r = espip_lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 5_000_000).unwrap();
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
    let Some(_g) = serial() else { return };
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
        let r = espip_lab::transfer(&exe(), (from, to), addr, 20_000_000).unwrap();
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

/// CPU ticks (user + system) of each thread of `pid`, by thread name.
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        out.push((
            comm.trim().to_string(),
            f.get(10).unwrap_or(&0) + f.get(11).unwrap_or(&0),
        ));
    }
    out
}

/// `tx_threads = 2`: a multi-queue TUN, one TX thread per queue. Sixteen TCP flows at once
/// from A to B: every hash equal, both of A's TX threads did work (the RX thread writes each
/// flow's ACKs to the queue its hash picks, so the kernel sends the flow to that queue's
/// thread), and B counts no replay (the two threads' packets interleave within the default
/// window). The flows' source ports are the kernel's choice, so their hashes are chance: with
/// eight flows all landed on one queue about once in 128 runs (it happened in a CI run), with
/// sixteen about once in 32768.
#[test]
fn two_tx_threads_carry_parallel_flows_with_no_replay_drops() {
    let Some(_g) = serial() else { return };
    let mode = LabMode::Esp(Cipher::Aes128Gcm);
    let mut pair = full_pair_edit("mq", mode, Cipher::Aes128Gcm, |_, t| {
        t.replace("[interface]\n", "[interface]\ntx_threads = 2\n")
    });
    let (a, b, dir) = (&pair.a, &pair.b, pair.dir.clone());
    let a_pid = pair.daemons[0].pid().unwrap();
    const BYTES: u64 = 5_000_000;
    let results: Vec<_> = std::thread::scope(|s| {
        let flows: Vec<_> = (0..16u16)
            .map(|i| {
                s.spawn(move || {
                    espip_lab::transfer_on(&exe(), (a, b), p2p::B_INNER, 5101 + i, BYTES).unwrap()
                })
            })
            .collect();
        flows.into_iter().map(|f| f.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.ok(BYTES), "{r:?}");
    }
    let ticks = thread_ticks(a_pid);
    let tx: Vec<_> = ticks
        .iter()
        .filter(|(n, _)| n.starts_with("espip-tx"))
        .collect();
    assert_eq!(tx.len(), 2, "two TX threads: {ticks:?}");
    assert!(
        tx.iter().all(|(_, t)| *t > 0),
        "both TX threads worked: {tx:?}"
    );
    let st = status_at(&dir.join("state-b/control.sock"));
    for r in ["replay", "bad_icv", "unknown_spi"] {
        assert_eq!(st.drops[r], 0, "B dropped {r}: {:?}", st.drops);
    }
    eprintln!(
        "tx_threads = 2: 16 flows of {BYTES} bytes, {:.0} Mbit/s each (median); A's threads {tx:?}",
        {
            let mut m: Vec<f64> = results.iter().map(|r| r.mbit_s()).collect();
            m.sort_by(|x, y| x.partial_cmp(y).unwrap());
            m[m.len() / 2]
        }
    );
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap(), "clean stop");
    }
}

/// The raw-socket modes' fast path (`interface.tx_path = "auto"`): ESP as protocol 50 and
/// IP-in-IP, over IPv4 and over IPv6, leave through the AF_PACKET socket with espip's own
/// Ethernet and outer IP headers (the peer's kernel accepts them: the transfer's hash is
/// equal); an outer packet above the interface's MTU goes through the raw socket, which
/// fragments it; `tx_path = "raw"` never uses the AF_PACKET socket.
#[test]
fn raw_modes_send_through_af_packet_and_fall_back_to_the_raw_socket() {
    let Some(_g) = serial() else { return };
    for (tag, mode, v6) in [
        ("afp4", LabMode::Esp(Cipher::Aes128Gcm), false),
        ("afi4", LabMode::IpIp, false),
        ("afp6", LabMode::Esp(Cipher::ChaCha20Poly1305), true),
        ("afi6", LabMode::IpIp, true),
    ] {
        let mut pair = fast_path_pair(tag, mode, v6, "");
        // The first ping makes the kernel resolve the neighbour; espip reads the next hop
        // within a quarter second of that.
        assert!(p2p::ping(&pair.a, p2p::B_INNER).0, "{tag}: ping");
        std::thread::sleep(std::time::Duration::from_millis(600));
        let r = espip_lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 5_000_000).unwrap();
        assert!(r.ok(5_000_000), "{tag}: {r:?}");
        let a = status_at(&pair.dir.join("state-a/control.sock"));
        let sent = a.peers[0].tx_packets;
        let fast = a.offload["af_packet_out"];
        // The pings went through the raw socket; the transfer's packets do not.
        assert!(
            fast > sent / 2 && fast <= sent,
            "{tag}: {fast} of {sent} packets through AF_PACKET"
        );
        assert_eq!(a.errors["send"], 0, "{tag}: {:?}", a.errors);
        for d in &mut pair.daemons {
            assert!(d.stop().unwrap());
        }
    }

    // A tunnel MTU above what the path carries: the large packets' outer packets exceed the
    // veth's 1500 bytes and are fragmented by the raw socket; the small ones stay fast.
    let mut pair = fast_path_pair(
        "afbig",
        LabMode::Esp(Cipher::Aes128Gcm),
        false,
        "mtu = 1500\n",
    );
    assert!(p2p::ping(&pair.a, p2p::B_INNER).0, "ping");
    std::thread::sleep(std::time::Duration::from_millis(600));
    let before = status_at(&pair.dir.join("state-a/control.sock"));
    let ping = netns::run(pair.a.command("ping").args([
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "-s",
        "1460",
        "-M",
        "do",
        p2p::B_INNER,
    ]))
    .unwrap();
    assert!(
        ping.status.success(),
        "1488-byte pings through a 1500-byte path: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let after = status_at(&pair.dir.join("state-a/control.sock"));
    let sent = after.peers[0].tx_packets - before.peers[0].tx_packets;
    let fast = after.offload["af_packet_out"] - before.offload["af_packet_out"];
    assert!(
        sent >= 3 && fast == 0,
        "{fast} of {sent} oversized packets through AF_PACKET"
    );
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }

    // tx_path = "raw": the kernel's IP output path only.
    let mut pair = fast_path_pair("afraw", LabMode::IpIp, false, "tx_path = \"raw\"\n");
    let r = espip_lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 2_000_000).unwrap();
    assert!(r.ok(2_000_000), "{r:?}");
    let a = status_at(&pair.dir.join("state-a/control.sock"));
    assert_eq!(a.offload["af_packet_out"], 0);
    assert!(a.peers[0].tx_packets > 100);
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

/// The XDP receive path (`interface.rx_path = "xdp"`): ESP over IPv4 and IP-in-IP over IPv6
/// arrive through the AF_XDP sockets on both ends (the transfer's hash is equal, nearly every
/// packet counted as `xdp_in`), while the underlay's own traffic (pings between the outer
/// addresses) still reaches the stack; the program goes with the daemon, also after a SIGKILL,
/// and a restarted daemon attaches it again.
#[test]
fn raw_modes_receive_through_af_xdp_and_the_program_goes_with_the_daemon() {
    let Some(_g) = serial() else { return };
    let xdp = "rx_path = \"xdp\"\n";
    for (tag, mode, v6) in [
        ("xdpe4", LabMode::Esp(Cipher::Aes128Gcm), false),
        ("xdpi6", LabMode::IpIp, true),
    ] {
        let mut pair = pair_over(tag, mode, v6, xdp, xdp);
        for (ns, d) in [(&pair.a, &pair.daemons[0]), (&pair.b, &pair.daemons[1])] {
            assert_eq!(
                xdp_programs(ns),
                1,
                "{tag}: XDP program on {}: {}",
                ns.name(),
                d.log()
            );
        }
        assert!(p2p::ping(&pair.a, p2p::B_INNER).0, "{tag}: ping");
        std::thread::sleep(std::time::Duration::from_millis(600));
        let r = espip_lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 5_000_000).unwrap();
        assert!(r.ok(5_000_000), "{tag}: {r:?}");
        let b = status_at(&pair.dir.join("state-b/control.sock"));
        let got = b.peers[0].rx_packets;
        let fast = b.offload["xdp_in"];
        assert!(
            got > 3000 && fast >= got * 9 / 10,
            "{tag}: {fast} of {got} packets through AF_XDP"
        );
        assert_eq!(b.kernel_drops["xdp_socket"], 0, "{tag}");
        if !v6 {
            hostile_frames_through_xdp(&pair);
        }
        // The underlay itself: not the tunnel's protocol, so the stack's.
        let outer_b = if v6 { p2p::B_OUTER6 } else { p2p::B_OUTER };
        let ping = netns::run(
            pair.a
                .command("ping")
                .args(["-c", "2", "-i", "0.2", "-W", "2", outer_b]),
        )
        .unwrap();
        assert!(
            ping.status.success(),
            "{tag}: underlay ping with XDP on both ends"
        );

        // SIGKILL: the kernel detaches the program with the daemon's last descriptor.
        // (a killed daemon does not exit successfully: stop_with says false)
        let _ = pair.daemons[0].stop_with(nix::sys::signal::Signal::SIGKILL);
        assert_eq!(
            xdp_programs(&pair.a),
            0,
            "{tag}: XDP program left after SIGKILL"
        );
        let cfg = pair.dir.join("a.toml");
        pair.daemons[0] = Daemon::start(&pair.a, &exe(), &cfg, &pair.dir.join("a2.log")).unwrap();
        assert_eq!(
            xdp_programs(&pair.a),
            1,
            "{tag}: XDP program after the restart"
        );
        assert!(
            p2p::ping(&pair.a, p2p::B_INNER).0,
            "{tag}: ping after the restart"
        );
        for d in &mut pair.daemons {
            assert!(d.stop().unwrap());
        }
        assert_eq!(
            xdp_programs(&pair.b),
            0,
            "{tag}: XDP program left after a stop"
        );
    }
}

/// Frames that only the XDP path parses itself (the kernel's IP input drops them before a raw
/// socket): a bad IPv4 header checksum and a total length beyond the frame are `bad_outer`,
/// a sound packet with the SA's SPI from an address that is not the peer's is
/// `wrong_source`; B keeps working.
fn hostile_frames_through_xdp(pair: &FullPair) {
    let link = pair.b.ip(&["-j", "link", "show", "veth0"]).unwrap();
    let link: serde_json::Value = serde_json::from_slice(&link.stdout).unwrap();
    let mac = link[0]["address"].as_str().unwrap().to_string();
    let sock = pair.dir.join("state-b/control.sock");
    let before = status_at(&sock);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/xdp_hostile.py");
    let out = netns::run(pair.a.command("/usr/bin/python3").arg(&script).args([
        "veth0",
        &mac,
        p2p::A_OUTER,
        p2p::B_OUTER,
    ]))
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent 3");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = status_at(&sock);
    let d = |m: &std::collections::BTreeMap<String, u64>,
             n: &std::collections::BTreeMap<String, u64>,
             k: &str| n[k] - m[k];
    assert_eq!(d(&before.offload, &after.offload, "xdp_in"), 3);
    assert_eq!(d(&before.errors, &after.errors, "bad_outer"), 2);
    assert_eq!(
        d(&before.drops, &after.drops, "wrong_source"),
        1,
        "{:?}",
        after.drops
    );
    assert!(
        p2p::ping(&pair.a, p2p::B_INNER).0,
        "ping after the hostile frames"
    );
}

/// How many interfaces of `ns` carry an XDP program (`ip -d link`).
fn xdp_programs(ns: &Netns) -> usize {
    let out = ns.ip(&["-d", "link", "show"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("prog/xdp"))
        .count()
}

/// IP-in-IP carries no ICV, and the kernel completes a coalesced packet's checksum without
/// checking what went into it: a UDP datagram corrupted on the wire must not reach the socket
/// inside one of B's coalesced TUN writes. Forged IP-in-IP packets straight from A's namespace
/// (A's espip is bypassed): 20 rounds of 10 datagrams of one flow, one corrupt in each round.
/// B's receiver gets exactly the 180 good ones, byte for byte and in order, while B did
/// coalesce the good neighbours of each corrupt datagram.
#[test]
fn a_corrupt_ip_in_ip_datagram_is_not_coalesced_into_a_valid_one() {
    let Some(_g) = serial() else { return };
    let mut pair = fast_path_pair("gcsum", LabMode::IpIp, false, "");
    assert!(p2p::ping(&pair.a, p2p::B_INNER).0, "ping");
    let recv = pair
        .b
        .command("/usr/bin/python3")
        .args([
            "-c",
            "import socket, hashlib\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('10.4.2.5', 5555))\ns.settimeout(2)\nh = hashlib.sha256()\nn = 0\ntry:\n    while True:\n        h.update(s.recv(65535))\n        n += 1\nexcept socket.timeout:\n    pass\nprint('got', n, h.hexdigest())",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = status_at(&pair.dir.join("state-b/control.sock"));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ipip_corrupt.py");
    let sent = netns::run(pair.a.command("/usr/bin/python3").arg(&script).args([
        p2p::A_INNER,
        p2p::B_INNER,
        p2p::B_OUTER,
    ]))
    .unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    let Some(good) = sent.strip_prefix("sent ") else {
        panic!("the injector failed: {sent}");
    };
    let got = recv.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&got.stdout).trim().to_string();
    assert_eq!(got, format!("got {good}"), "only the good datagrams arrive");
    let after = status_at(&pair.dir.join("state-b/control.sock"));
    assert!(
        after.offload["gro_out"] > before.offload["gro_out"],
        "B coalesced the good datagrams (else this test proves nothing): {:?}",
        after.offload
    );
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

/// A physical NIC's GRO merges consecutive IP-in-IP packets of one inner TCP flow (and of
/// one inner UDP flow whose socket asked for UDP GRO) into one packet of up to 64 KB with a
/// partial checksum; a raw socket cannot tell where the originals ended. Here B's veth does
/// what such a NIC does (GRO on, A's side without TSO so that the veth takes its NAPI path,
/// and a flush timeout so that GRO holds packets across polls). B's espip must take the
/// merged packets from its `AF_PACKET` socket with their segment size and cut them back:
/// before it did, this transfer crawled at under 1 Mbit/s (every merged packet dropped).
#[test]
fn ip_in_ip_packets_merged_by_the_receivers_gro_are_cut_back() {
    let Some(_g) = serial() else { return };
    // IPv4 in IPv4 (Linux's ipip_gro_receive), then IPv4 in IPv6 (ip4ip6_gro_receive).
    for v6 in [false, true] {
        merged_by_gro(v6);
    }
}

fn merged_by_gro(v6: bool) {
    let tag = if v6 { "grom6" } else { "grom" };
    let mut pair = fast_path_pair(tag, LabMode::IpIp, v6, "");
    let sh = |ns: &netns::Netns, script: &str| {
        let out = netns::run(ns.command("/bin/sh").args(["-c", script])).unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    };
    sh(&pair.a, "ethtool -K veth0 tso off gso off");
    sh(
        &pair.b,
        "ethtool -K veth0 gro on && echo 200000 > /sys/class/net/veth0/gro_flush_timeout \
         && echo 2 > /sys/class/net/veth0/napi_defer_hard_irqs",
    );
    let r = espip_lab::transfer(&exe(), (&pair.a, &pair.b), p2p::B_INNER, 10_000_000).unwrap();
    assert!(r.ok(10_000_000), "{r:?}");
    let b = status_at(&pair.dir.join("state-b/control.sock"));
    let merged_tcp = b.offload["ipip_gro_in"];
    assert!(
        merged_tcp > 0,
        "B's kernel merged IP-in-IP packets (else this test proves nothing): {:?}",
        b.offload
    );
    // UDP: B's receiver asks for UDP GRO, so B's kernel merges the inner datagrams too; they
    // must come out as the same 50 datagrams of 1200 bytes (UDP keeps its boundaries).
    fifty_datagrams_arrive(&pair, true);
    // A flow with a 256-byte MSS: many small pieces per merged packet. (One of more than
    // the 128 pieces B holds at once would be cut in turns; this veth's GRO did not merge that
    // many in our runs, so `gso::tests::cutting_in_turns_gives_the_same_segments` covers it.)
    let recv = pair
        .b
        .command("/usr/bin/python3")
        .args([
            "-c",
            "import socket, hashlib\nl = socket.socket()\nl.bind(('10.4.2.5', 5556))\nl.listen(1)\nl.settimeout(20)\nc, _ = l.accept()\nc.settimeout(20)\nh = hashlib.sha256()\nn = 0\nwhile True:\n    d = c.recv(65536)\n    if not d:\n        break\n    h.update(d)\n    n += len(d)\nprint(n, h.hexdigest())",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = netns::run(pair.a.command("/usr/bin/python3").args([
        "-c",
        "import socket, hashlib\ns = socket.socket()\ns.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 256)\ns.settimeout(20)\ns.connect(('10.4.2.5', 5556))\nd = bytes(range(256)) * 12000\ns.sendall(d)\ns.close()\nprint(len(d), hashlib.sha256(d).hexdigest())",
    ]))
    .unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    let got = recv.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        sent,
        "3 MB with a 256-byte MSS arrive unchanged"
    );
    let b = status_at(&pair.dir.join("state-b/control.sock"));
    eprintln!(
        "outer IPv{}: merged IP-in-IP packets cut back: {merged_tcp} during the TCP transfer, {} during the UDP burst and the small-MSS flow",
        if v6 { 6 } else { 4 },
        b.offload["ipip_gro_in"] - merged_tcp
    );
    assert_eq!(b.errors["offload"], 0);
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

/// The `AF_PACKET` socket for GRO-merged IP-in-IP packets sees them before IP input decides
/// whether they are for this host: one addressed to another host (which this host would
/// forward or drop) must not be decapsulated. Forged frames with the peer's outer source go
/// into a NAPI tap in B's namespace (GRO merges them as a NIC's driver would): to an address
/// B does not have, then to one it has. Only the second are taken.
#[test]
fn merged_ip_in_ip_packets_for_another_host_are_not_decapsulated() {
    let Some(_g) = serial() else { return };
    let mut pair = fast_path_pair("gromx", LabMode::IpIp, false, "");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/gro_forge.py");
    let forge = |dst: &str| {
        let out = netns::run(pair.b.command("/usr/bin/python3").arg(&script).args([
            "198.51.100.2/24",
            p2p::A_OUTER,
            dst,
            p2p::A_INNER,
            p2p::B_INNER,
        ]))
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "sent 10",
            "{out:?}"
        );
    };
    let status = || status_at(&pair.dir.join("state-b/control.sock"));
    let before = status();
    forge("198.51.100.99");
    let mid = status();
    assert_eq!(
        mid.offload["ipip_gro_in"], before.offload["ipip_gro_in"],
        "nothing for another host was cut back"
    );
    assert_eq!(
        mid.peers[0].rx_packets, before.peers[0].rx_packets,
        "nor delivered"
    );
    assert!(
        mid.errors["bad_outer"] > before.errors["bad_outer"],
        "the merged packet was seen and refused (else this test proves nothing): {:?}",
        mid.errors
    );
    forge("198.51.100.2");
    let after = status();
    assert!(
        after.offload["ipip_gro_in"] > mid.offload["ipip_gro_in"],
        "the same packets to this host were merged and cut back: {:?}",
        after.offload
    );
    assert_eq!(
        after.peers[0].rx_packets,
        mid.peers[0].rx_packets + 10,
        "all 10 inner packets taken"
    );
    for d in &mut pair.daemons {
        assert!(d.stop().unwrap());
    }
}

/// A sends 5 x 12000 bytes with `UDP_SEGMENT` = 1200 to B (10.4.2.5:5555); B must receive
/// the same 50 datagrams of 1200 bytes, in order, byte for byte. `udp_gro`: B's socket asks
/// for UDP GRO and splits what it receives by the segment size the kernel reports (`UDP_GRO`
/// cmsg).
fn fifty_datagrams_arrive(pair: &FullPair, udp_gro: bool) {
    let recv = pair
        .b
        .command("/usr/bin/python3")
        .args([
            "-c",
            "import socket, struct, sys, hashlib\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nif sys.argv[1] == 'gro':\n    s.setsockopt(17, 104, 1)\ns.bind(('10.4.2.5', 5555))\ns.settimeout(3)\nh = hashlib.sha256()\nsizes = []\ntry:\n    while len(sizes) < 50:\n        d, anc, _, _ = s.recvmsg(65535, 64)\n        seg = len(d)\n        for lvl, typ, v in anc:\n            if lvl == 17 and typ == 104:\n                seg = struct.unpack('=H', v[:2])[0] if len(v) == 2 else struct.unpack('=i', v[:4])[0]\n        for i in range(0, len(d), seg):\n            sizes.append(len(d[i:i + seg]))\n            h.update(d[i:i + seg])\nexcept socket.timeout:\n    pass\nprint(len(sizes), sorted(set(sizes)), h.hexdigest())",
            if udp_gro { "gro" } else { "plain" },
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = netns::run(pair.a.command("/usr/bin/python3").args([
        "-c",
        "import socket, hashlib\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.setsockopt(17, 103, 1200)\nh = hashlib.sha256()\nfor i in range(5):\n    d = b''.join(bytes([i * 10 + k]) * 1200 for k in range(10))\n    h.update(d)\n    s.sendto(d, ('10.4.2.5', 5555))\nprint('sent', h.hexdigest())",
    ]))
    .unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    let Some(digest) = sent.strip_prefix("sent ") else {
        panic!("the sender failed: {sent}");
    };
    let got = recv.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&got.stdout).trim().to_string();
    assert_eq!(
        got,
        format!("50 [1200] {digest}"),
        "B received every 1200-byte datagram, in order, unchanged"
    );
}

/// The p2p lab's pair in `mode` over IPv4 or IPv6, `a_interface` added to A's `[interface]`.
fn fast_path_pair(tag: &str, mode: LabMode, v6: bool, a_interface: &str) -> FullPair {
    pair_over(tag, mode, v6, a_interface, "")
}

/// The p2p lab's pair in `mode` over IPv4 or IPv6, with lines added to each `[interface]`.
fn pair_over(tag: &str, mode: LabMode, v6: bool, a_interface: &str, b_interface: &str) -> FullPair {
    let (a, b) = if v6 {
        p2p::topology_v6(tag).unwrap()
    } else {
        p2p::topology(tag).unwrap()
    };
    let cipher = match mode {
        LabMode::Esp(c) | LabMode::EspUdp(c) => c,
        _ => Cipher::Aes128Gcm,
    };
    let keys = p2p::LabKeys::generate(cipher).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut daemons = Vec::new();
    for (me_a, ns, host) in [(true, &a, "a"), (false, &b, "b")] {
        let cfg = dir.join(format!("{host}.toml"));
        let mut text = p2p::config_text_over(
            mode,
            me_a,
            Some(&keys),
            false,
            &dir.join(format!("state-{host}")),
            v6,
        );
        let extra = if me_a { a_interface } else { b_interface };
        text = text.replace("[interface]\n", &format!("[interface]\n{extra}"));
        std::fs::write(&cfg, text).unwrap();
        daemons.push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{host}.log"))).unwrap());
    }
    FullPair { a, b, daemons, dir }
}

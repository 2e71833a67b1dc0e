//! Namespace tests: Independent ESP implementations against espip: scapy as the peer (ESP and ESP in UDP, every cipher, over IPv4 and IPv6), tshark decrypting espip's captures with the SAs `espip sa --wireshark` exports.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

fn scapy_interop(tag: &str, cipher: Cipher, udp: bool) {
    scapy_interop_over(tag, cipher, udp, false)
}

fn scapy_interop_over(tag: &str, cipher: Cipher, udp: bool, outer_v6: bool) {
    let Some(_g) = serial() else { return };
    let mode = if udp {
        LabMode::EspUdp(cipher)
    } else {
        LabMode::Esp(cipher)
    };
    let mut h = half_lab_over(tag, mode, cipher, "", outer_v6);
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
            .args(if outer_v6 { &["--outer6"][..] } else { &[] })
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
            p.endpoint,
            if outer_v6 {
                "[2001:db8:2::2]:4501"
            } else {
                "192.0.2.2:4501"
            },
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

/// scapy's ESP over an IPv6 underlay: ESP as next header 50, and ESP in UDP/IPv6.
#[test]
fn scapy_interop_over_ipv6_esp_and_esp_in_udp() {
    scapy_interop_over("scapy6", Cipher::Aes128Gcm, false, true);
    scapy_interop_over("scapy6u", Cipher::Aes128Gcm, true, true);
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
    let Some(_g) = serial() else { return };
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

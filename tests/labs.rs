//! Namespace tests: Every `espip lab` scenario end to end (SCENARIOS.md): p2p in each mode and cipher, same-LAN, the SEED gateway, the upstream-only relays, the hub.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

#[test]
fn p2p_esp_aes128_50mb() {
    let Some(_g) = serial() else { return };
    let t = lab(&["--cipher", "aes-128-gcm", "--megabytes", "50"]);
    assert!(t.contains("no plaintext on the wire"), "{t}");
    assert!(t.contains("7 passed"), "{t}");
}

#[test]
fn p2p_esp_aes256_esn_50mb() {
    let Some(_g) = serial() else { return };
    lab(&["--cipher", "aes-256-gcm", "--esn", "--megabytes", "50"]);
}

#[test]
fn p2p_esp_chacha20_50mb() {
    let Some(_g) = serial() else { return };
    lab(&["--cipher", "chacha20-poly1305", "--megabytes", "50"]);
}

/// The IPv6 underlay, every mode: ESP as IPv6 next header 50, ESP in UDP over IPv6, IPv4 in
/// IPv6 (next header 4); the lab's own checks (transfer hash, only the tunnel's protocol
/// between the two IPv6 addresses on the wire, no plaintext, clean stop) and the tunnel MTU
/// 20 bytes smaller than over IPv4.
#[test]
fn p2p_over_an_ipv6_underlay_every_mode() {
    let Some(_g) = serial() else { return };
    for (mode, want, mtu) in [
        ("esp", "only protocol 50", "mtu 1426"),
        ("esp-udp", "only UDP 4500 -> 4500", "mtu 1418"),
        ("ipip", "only protocol 4", "mtu 1460"),
    ] {
        let t = lab(&["--mode", mode, "--outer", "ipv6", "--megabytes", "20"]);
        assert!(
            t.contains("over IPv6") && t.contains(want) && t.contains(mtu),
            "{t}"
        );
    }
}

#[test]
fn p2p_ipip_50mb() {
    let Some(_g) = serial() else { return };
    let t = lab(&["--mode", "ipip", "--megabytes", "50"]);
    assert!(t.contains("only protocol 4"), "{t}");
}

#[test]
fn same_lan_lab_50mb() {
    let Some(_g) = serial() else { return };
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

#[test]
fn gateway_lab_and_its_diagnosis() {
    let Some(_g) = serial() else { return };
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
    let Some(_g) = serial() else { return };
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
    let Some(_g) = serial() else { return };
    let text = lab_scenario(&["hub"]);
    assert!(text.contains("6 passed, 0 failed"), "{text}");
    assert!(text.contains("H's kernel forwarded 0 datagrams"), "{text}");
}

/// One daemon, peers over both underlays: A reaches B as peer "b4" over IPv4 (ESP, protocol
/// 50) and as peer "b6" over IPv6 (ESP in UDP/IPv6), each with its own SAs and inner prefix.
/// A transfer through each has an equal hash, the status shows both endpoints, and neither end
/// counts a drop of the two peers' traffic.
#[test]
fn one_daemon_with_an_ipv4_peer_and_an_ipv6_peer() {
    let Some(_g) = serial() else { return };
    let (a, b) = p2p::topology_v6("mixed").unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = || {
        espip::sys::random_key(Cipher::Aes128Gcm)
            .unwrap()
            .to_hex()
            .to_string()
    };
    let (k4ab, k4ba, k6ab, k6ba) = (key(), key(), key(), key());
    // (me, inner v4 address, inner v6-peer address, v4 endpoint, v6 endpoint, keys out/in)
    let hosts = [
        (
            "a",
            "10.4.2.99",
            "10.4.3.99",
            "192.0.2.2",
            "[2001:db8:2::2]:4500",
            (&k4ab, &k4ba),
            (&k6ab, &k6ba),
            (0x4001, 0x4002, 0x6001, 0x6002),
        ),
        (
            "b",
            "10.4.2.5",
            "10.4.3.5",
            "192.0.2.1",
            "[2001:db8:2::1]:4500",
            (&k4ba, &k4ab),
            (&k6ba, &k6ab),
            (0x4002, 0x4001, 0x6002, 0x6001),
        ),
    ];
    let mut daemons = Vec::new();
    for (i, (me, in4, in6, ep4, ep6, k4, k6, spi)) in hosts.iter().enumerate() {
        let (other4, other6) = if i == 0 {
            ("10.4.2.5", "10.4.3.5")
        } else {
            ("10.4.2.99", "10.4.3.99")
        };
        let state = dir.join(format!("state-{me}"));
        let text = format!(
            "[interface]\nname = \"espip0\"\naddress = [\"{in4}/24\", \"{in6}/24\"]\nstate_dir = \"{}\"\ncontrol = \"{}\"\n\n\
             [[peer]]\nname = \"{}4\"\nendpoint = \"{ep4}\"\nallowed_ips = [\"{other4}/32\"]\nmode = \"esp\"\ncipher = \"aes-128-gcm\"\nspi_out = \"{:#x}\"\nspi_in = \"{:#x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\n\n\
             [[peer]]\nname = \"{}6\"\nendpoint = \"{ep6}\"\nallowed_ips = [\"{other6}/32\"]\nmode = \"esp-udp\"\ncipher = \"aes-128-gcm\"\nspi_out = \"{:#x}\"\nspi_in = \"{:#x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\n",
            state.display(),
            state.join("control.sock").display(),
            if i == 0 { "b" } else { "a" },
            spi.0,
            spi.1,
            k4.0,
            k4.1,
            if i == 0 { "b" } else { "a" },
            spi.2,
            spi.3,
            k6.0,
            k6.1,
        );
        let cfg = dir.join(format!("{me}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let ns = if i == 0 { &a } else { &b };
        daemons.push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{me}.log"))).unwrap());
    }
    // The route to B's second address takes A's second address as its source (espip's routes
    // carry no preferred source; the kernel would pick the TUN's first address, which B
    // accepts only from peer a4).
    a.ip(&[
        "route",
        "replace",
        "10.4.3.5/32",
        "dev",
        "espip0",
        "src",
        "10.4.3.99",
    ])
    .unwrap();
    for to in ["10.4.2.5", "10.4.3.5"] {
        let r = espip_lab::transfer(&exe(), (&a, &b), to, 10_000_000).unwrap();
        assert!(r.ok(10_000_000), "to {to}: {r:?}");
    }
    let (sa, sb) = (
        status_at(&dir.join("state-a/control.sock")),
        status_at(&dir.join("state-b/control.sock")),
    );
    let endpoints: Vec<_> = sa.peers.iter().map(|p| p.endpoint.clone()).collect();
    assert_eq!(endpoints, ["192.0.2.2", "[2001:db8:2::2]:4500"]);
    for p in &sa.peers {
        assert!(p.tx_packets > 1000 && p.rx_packets > 100, "{p:?}");
    }
    for (who, st) in [("A", &sa), ("B", &sb)] {
        for r in [
            "replay",
            "bad_icv",
            "unknown_spi",
            "wrong_source",
            "not_allowed",
            "malformed",
        ] {
            assert_eq!(st.drops[r], 0, "{who} dropped {r}: {:?}", st.drops);
        }
    }
    for d in &mut daemons {
        assert!(d.stop().unwrap(), "clean stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

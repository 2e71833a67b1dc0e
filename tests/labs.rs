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

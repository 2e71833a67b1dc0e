//! Namespace tests: Hostile packets: each malformed, forged or replayed packet is dropped under the right counter and never answered; a 30-second garbage flood does not stop a transfer.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

#[test]
fn hostile_packets_are_dropped_with_the_right_counter_and_never_answered() {
    let Some(_g) = serial() else { return };
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

#[test]
fn a_30_second_garbage_flood_does_not_stop_a_transfer() {
    let Some(_g) = serial() else { return };
    const BYTES: u64 = 20_000_000;
    const FLOOD_SECONDS: u64 = 30;
    let mut pair = full_pair("flood", Cipher::Aes128Gcm, "");
    let (a, b, dir) = (&pair.a, &pair.b, pair.dir.clone());
    let a_pid = pair.daemons[0].pid().unwrap();
    let transfer = || espip_lab::transfer(&exe(), (b, a), p2p::A_INNER, BYTES).unwrap();
    // Baseline: B -> A, so that A's receive path carries the data and meets the flood.
    let base = transfer();
    assert!(base.ok(BYTES), "baseline transfer: {base:?}");
    let rss_before = rss_kb(a_pid);
    let flood = b
        .command(exe())
        .args(["lab-tool", "flood", "--dst", p2p::A_OUTER])
        .args(["--spi", &format!("{SPI_B_TO_A:#x}")])
        .args(["--seconds", &FLOOD_SECONDS.to_string()])
        // The load of docs/security.md (254 k packets/s, then as fast as one core of that
        // machine sent), the same on every machine: on a faster one the unpaced flooder sent
        // 560 k/s and the debug build's transfers nearly stopped (see docs/security.md).
        .args(["--pps", "250000"])
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

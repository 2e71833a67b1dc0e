//! Namespace tests of endpoints that move (issue 29): a server whose configuration names no
//! address of its client learns it from the client's first authenticated packet and follows
//! it when the client's address changes; forged and replayed packets from a new address move
//! nothing.

mod common;
use common::*;
use espip_lab::p2p::{A_INNER, A_OUTER, B_INNER, B_OUTER};
use std::time::{Duration, Instant};

/// A (client: knows B's address, has no `local`) and B (server: no `endpoint` for A).
struct Roam {
    a: Netns,
    b: Netns,
    daemons: Vec<Daemon>,
    dir: PathBuf,
}

impl Drop for Roam {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Roam {
    fn start(tag: &str, mode: LabMode) -> Roam {
        let (a, b) = p2p::topology(tag).unwrap();
        let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
        let mut daemons = Vec::new();
        for me_a in [false, true] {
            let host = if me_a { "a" } else { "b" };
            let text = p2p::config_text(
                mode,
                me_a,
                Some(&keys),
                false,
                &dir.join(format!("state-{host}")),
            );
            // The client's source follows its address (no `local`); the server names no
            // address of the client.
            let drop = if me_a { "local =" } else { "endpoint =" };
            let text: String = text
                .lines()
                .filter(|l| !l.starts_with(drop))
                .map(|l| format!("{l}\n"))
                .collect();
            let cfg = dir.join(format!("{host}.toml"));
            write_private(&cfg, &text);
            let ns = if me_a { &a } else { &b };
            daemons
                .push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{host}.log"))).unwrap());
        }
        Roam { a, b, daemons, dir }
    }

    fn status(&self, host: &str) -> espip::status::Status {
        status_at(&self.dir.join(format!("state-{host}/control.sock")))
    }

    fn logs(&self) -> String {
        ["a", "b"]
            .iter()
            .map(|h| {
                format!(
                    "--- {h}.log\n{}\n",
                    std::fs::read_to_string(self.dir.join(format!("{h}.log"))).unwrap_or_default()
                )
            })
            .collect()
    }
}

/// The address of an IPv4 endpoint shown as `address` or `address:port`.
fn host(endpoint: &str) -> &str {
    endpoint.split(':').next().unwrap_or_default()
}

/// Pings from `ns` to `to`: how many of `n` were answered.
fn pings(ns: &Netns, to: &str, n: u32) -> usize {
    let o = netns::run(
        ns.command("ping")
            .args(["-c", &n.to_string(), "-i", "0.2", "-W", "1", to]),
    )
    .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .matches("bytes from")
        .count()
}

/// Move A's outer address from `from` to `to` (the /24 stays).
fn move_a(r: &Roam, from: &str, to: &str) {
    r.a.ip(&["addr", "del", &format!("{from}/24"), "dev", "veth0"])
        .unwrap();
    r.a.ip(&["addr", "add", &format!("{to}/24"), "dev", "veth0"])
        .unwrap();
}

/// How long after `start` the first of a run of pings (one per 50 ms) is answered.
fn outage(ns: &Netns, to: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let o = netns::run(ns.command("ping").args(["-c", "1", "-W", "0.05", to])).unwrap();
        if o.status.success() {
            return Some(start.elapsed());
        }
    }
    None
}

fn roams(mode: LabMode, tag: &str) {
    let r = Roam::start(tag, mode);
    // Before A has sent anything, B has nowhere to send: dropped and counted.
    assert_eq!(pings(&r.b, A_INNER, 2), 0);
    let st = r.status("b");
    let p = &st.peers[0];
    assert!(p.endpoint_learned, "{p:?}");
    assert_eq!(p.endpoint, "(none yet)");
    assert!(st.drops["no_endpoint"] >= 2, "{:?}", st.drops);
    // A's first packet teaches B its address.
    assert_eq!(pings(&r.a, B_INNER, 3), 3, "{}", r.logs());
    let p = &r.status("b").peers[0];
    assert_eq!(host(&p.endpoint), A_OUTER, "{p:?}");
    assert!(p.endpoint_changed_unix.is_some());
    assert_eq!(p.endpoint_moves, 0);
    // A moves twice; B follows each time.
    for (i, (from, to)) in [(A_OUTER, "192.0.2.11"), ("192.0.2.11", "192.0.2.12")]
        .into_iter()
        .enumerate()
    {
        move_a(&r, from, to);
        let took = outage(&r.a, B_INNER, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no answer 10 s after the move to {to}\n{}", r.logs()));
        eprintln!("{tag}: after the move to {to}, the first ping answered in {took:?}");
        assert_eq!(pings(&r.a, B_INNER, 3), 3, "{}", r.logs());
        let p = &r.status("b").peers[0];
        assert_eq!(host(&p.endpoint), to, "{p:?}");
        assert_eq!(p.endpoint_moves, i as u64 + 1, "{p:?}");
        // B's own pings reach A at its new address.
        assert_eq!(pings(&r.b, A_INNER, 2), 2, "{}", r.logs());
    }
    // `espip sa` exports the SAs at the learned address, for Wireshark.
    let sa = Command::new(exe())
        .args(["sa", "--socket"])
        .arg(r.dir.join("state-b/control.sock"))
        .output()
        .unwrap();
    let sa = String::from_utf8_lossy(&sa.stdout);
    assert!(sa.contains("192.0.2.12"), "{sa}");
    let text = Command::new(exe())
        .args(["show", "--socket"])
        .arg(r.dir.join("state-b/control.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("endpoint learned from the peer's packets:") && text.contains("2 moves"),
        "{text}"
    );
}

#[test]
fn a_server_without_endpoint_learns_and_follows_a_roaming_client_over_esp() {
    let Some(_g) = serial() else { return };
    roams(LabMode::Esp(Cipher::Aes128Gcm), "roamesp");
}

#[test]
fn a_server_without_endpoint_learns_and_follows_a_roaming_client_over_esp_in_udp() {
    let Some(_g) = serial() else { return };
    roams(LabMode::EspUdp(Cipher::Aes128Gcm), "roamudp");
}

/// From an address of its own, an attacker on the link sends B a forged ESP packet for A's
/// SPI and a replay of a genuine one captured on the wire: B's endpoint for A stays where it
/// was (the counters say bad_icv and replay), and B keeps answering A there.
#[test]
fn forged_and_replayed_packets_from_a_new_address_move_nothing() {
    let Some(_g) = serial() else { return };
    let r = Roam::start("roamforge", LabMode::Esp(Cipher::Aes128Gcm));
    let pcap = r.dir.join("wire.pcap");
    let mut dump =
        r.b.command("tcpdump")
            .args(["-i", "veth0", "-n", "-U", "-c", "2", "-w"])
            .arg(&pcap)
            .arg("esp and src host ".to_string() + A_OUTER)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pings(&r.a, B_INNER, 3), 3, "{}", r.logs());
    let _ = dump.wait();
    let before = r.status("b");
    assert_eq!(host(&before.peers[0].endpoint), A_OUTER);
    // The attacker's address, on A's link.
    r.a.ip(&["addr", "add", "192.0.2.66/24", "dev", "veth0"])
        .unwrap();
    let script = format!(
        r#"
from scapy.all import IP, ESP, Raw, rdpcap, send
genuine = [p for p in rdpcap("{pcap}") if p.haslayer(ESP)][0]
forged = IP(src="192.0.2.66", dst="{B_OUTER}") / ESP(spi={spi}, seq=1000) / Raw(b"\x00" * 80)
replay = IP(src="192.0.2.66", dst="{B_OUTER}", proto=50) / Raw(bytes(genuine[IP].payload))
send([forged, replay], verbose=0)
"#,
        pcap = pcap.display(),
        spi = SPI_A_TO_B,
    );
    let o = netns::run(r.a.command("/usr/bin/python3").args(["-c", &script])).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(300));
    let after = r.status("b");
    let d = |s: &espip::status::Status, k: &str| s.drops.get(k).copied().unwrap_or(0);
    assert_eq!(
        d(&after, "bad_icv"),
        d(&before, "bad_icv") + 1,
        "{:?}",
        after.drops
    );
    assert_eq!(
        d(&after, "replay"),
        d(&before, "replay") + 1,
        "{:?}",
        after.drops
    );
    assert_eq!(after.peers[0].endpoint, before.peers[0].endpoint);
    assert_eq!(after.peers[0].endpoint_moves, 0);
    assert_eq!(pings(&r.b, A_INNER, 2), 2, "{}", r.logs());
}

/// `espip lab roaming`: a TCP transfer from the client survives two address changes (hash
/// equal on both ends), the server following each.
#[test]
fn the_roaming_lab_keeps_a_transfer_across_two_moves() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&["roaming", "--mode", "esp-udp", "--megabytes", "20"]);
    for c in [
        "[PASS] B has nowhere to send before A speaks",
        "[PASS] A moves to 192.0.2.11 during the transfer: B follows",
        "[PASS] A moves to 192.0.2.12 during the transfer: B follows",
        "[PASS] TCP transfer of 20 MB A -> B across both moves",
        " 0 failed",
    ] {
        assert!(t.contains(c), "missing {c:?} in:\n{t}");
    }
}

/// `espip lab roaming --keying ikev2`: the same with an IKEv2 pair, the server a responder
/// without endpoint: it knows the client's address from its IKE_AUTH, follows both moves, and
/// keeps the same IKE SA.
#[test]
fn the_roaming_lab_with_ikev2_keeps_the_ike_sa_across_two_moves() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&["roaming", "--keying", "ikev2", "--megabytes", "20"]);
    for c in [
        "[PASS] B learns A's address from A's IKE_AUTH and reaches A first",
        "[PASS] A moves to 192.0.2.11 during the transfer: B follows",
        "[PASS] A moves to 192.0.2.12 during the transfer: B follows",
        "[PASS] the IKE SA survives both moves",
        "[PASS] TCP transfer of 20 MB A -> B across both moves",
        " 0 failed",
    ] {
        assert!(t.contains(c), "missing {c:?} in:\n{t}");
    }
}

const WITH_MOBIKE: &[&str] = &[
    "[PASS] the IKE SA is up with MOBIKE on both sides, and the tunnel carries pings",
    "[PASS] A moves to 192.0.2.11 during the transfer: B follows",
    "[PASS] A moves to 192.0.2.12 during the transfer: B follows",
    "[PASS] the same IKE SA on both sides across both moves, moved by UPDATE_SA_ADDRESSES",
    "[PASS] TCP transfer of 15 MB A -> B across both moves",
    " 0 failed",
];

/// `espip lab roaming --keying ikev2 --strongswan SIDE`: every MOBIKE check passes.
fn mobike_lab(side: &str) {
    let t = lab_scenario(&[
        "roaming",
        "--keying",
        "ikev2",
        "--strongswan",
        side,
        "--megabytes",
        "15",
    ]);
    for c in WITH_MOBIKE {
        assert!(t.contains(c), "missing {c:?} in:\n{t}");
    }
}

/// MOBIKE with strongSwan's charon as the client that moves (issue 29): espip, the server,
/// names the client's first address; charon's UPDATE_SA_ADDRESSES (with COOKIE2) moves
/// espip's IKE SA and data path endpoint, the same IKE SA on both sides throughout.
#[test]
fn mobike_with_strongswan_as_the_client_that_moves() {
    let Some(_g) = serial() else { return };
    mobike_lab("client");
}

/// MOBIKE with espip as the client that moves and charon as the server: espip sees its
/// source address change in the kernel's routes and announces it.
#[test]
fn mobike_with_espip_as_the_client_that_moves_to_strongswan() {
    let Some(_g) = serial() else { return };
    mobike_lab("server");
}

/// `max_paths` in namespaces (issue 29): A has three paths to B's one address, each from its
/// own address (`local`); B (no address of A configured, `max_paths = 2`, `path_idle = 2`)
/// learns two of them and drops the third's packets as `path_limit`. When one learned
/// address goes away, the third takes its slot once it has been silent (two probe
/// intervals); when another goes away with no newcomer, its slot is forgotten after
/// `path_idle` seconds, and the remaining path carries the tunnel throughout.
#[test]
fn max_paths_limit_takeover_and_expiry_of_learned_paths() {
    let Some(_g) = serial() else { return };
    const ADDRS: [&str; 3] = ["192.0.2.21", "192.0.2.22", "192.0.2.23"];
    let (a, b) = p2p::topology("mpl").unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-mpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ip in ADDRS {
        a.ip(&["addr", "add", &format!("{ip}/24"), "dev", "veth0"])
            .unwrap();
    }
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let mut daemons = Vec::new();
    for me_a in [false, true] {
        let host = if me_a { "a" } else { "b" };
        let text = p2p::config_text(
            LabMode::EspUdp(Cipher::Aes128Gcm),
            me_a,
            Some(&keys),
            false,
            &dir.join(format!("state-{host}")),
        );
        let mut text: String = text
            .lines()
            .filter(|l| !l.starts_with("endpoint =") && !l.starts_with("local ="))
            .map(|l| format!("{l}\n"))
            .collect();
        if me_a {
            for (i, ip) in ADDRS.iter().enumerate() {
                text.push_str(&format!(
                    "\n[[peer.path]]\nname = \"p{}\"\nendpoint = \"{B_OUTER}:4500\"\nlocal = \"{ip}\"\n",
                    i + 1
                ));
            }
        } else {
            // (Inserted among the peer's keys: the config ends with the peer table.)
            text.push_str("max_paths = 2\npath_idle = 2\n");
        }
        let cfg = dir.join(format!("{host}.toml"));
        write_private(&cfg, &text);
        let ns = if me_a { &a } else { &b };
        daemons.push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{host}.log"))).unwrap());
    }
    let ctl_b = dir.join("state-b/control.sock");
    let learned = || -> Vec<Option<String>> {
        status_at(&ctl_b).peers[0]
            .multipath
            .as_ref()
            .map(|m| {
                m.paths
                    .iter()
                    .map(|p| (!p.endpoint.starts_with('(')).then(|| host(&p.endpoint).to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let path_limit = || {
        status_at(&ctl_b)
            .drops
            .get("path_limit")
            .copied()
            .unwrap_or(0)
    };
    let logs = || {
        ["a", "b"]
            .iter()
            .map(|h| std::fs::read_to_string(dir.join(format!("{h}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    // B learns two of A's three addresses; the third is refused, counted.
    assert!(
        wait(Duration::from_secs(10), || learned()
            .iter()
            .flatten()
            .count()
            == 2
            && path_limit() > 0),
        "learned {:?}, path_limit {}\n{}",
        learned(),
        path_limit(),
        logs()
    );
    assert_eq!(pings(&a, B_INNER, 3), 3);
    let first = learned();
    let third = ADDRS
        .iter()
        .find(|ip| !first.iter().flatten().any(|l| l == *ip))
        .unwrap()
        .to_string();
    // One learned address goes: the third takes its slot once it has been silent.
    let gone = first[0].clone().unwrap();
    a.ip(&["addr", "del", &format!("{gone}/24"), "dev", "veth0"])
        .unwrap();
    assert!(
        wait(Duration::from_secs(5), || learned()
            .iter()
            .flatten()
            .any(|l| *l == third)),
        "after {gone} went: {:?}\n{}",
        learned(),
        logs()
    );
    assert!(!learned().iter().flatten().any(|l| *l == gone));
    // Another goes, with no newcomer: it is found down within a few probe intervals, and
    // its slot is forgotten after path_idle (2 s), logged once.
    let now = learned();
    let second_gone = now.iter().flatten().find(|l| **l != third).unwrap().clone();
    a.ip(&["addr", "del", &format!("{second_gone}/24"), "dev", "veth0"])
        .unwrap();
    let t0 = Instant::now();
    let b_log = || std::fs::read_to_string(dir.join("b.log")).unwrap_or_default();
    let forgot = |l: &str| {
        l.contains("learned path forgotten") && l.contains(&format!("endpoint={second_gone}"))
    };
    assert!(
        wait(Duration::from_secs(6), || b_log().lines().any(forgot)),
        "{second_gone} not forgotten: {:?}\n{}",
        learned(),
        logs()
    );
    let forgotten_after = t0.elapsed();
    assert!(
        forgotten_after >= Duration::from_millis(1800),
        "forgotten after {forgotten_after:?}: before path_idle"
    );
    let st = status_at(&ctl_b);
    let paths = &st.peers[0].multipath.as_ref().unwrap().paths;
    let states: Vec<(String, String)> = paths
        .iter()
        .map(|p| (host(&p.endpoint).to_string(), p.state.clone()))
        .collect();
    assert!(
        states.contains(&(second_gone.clone(), "forgotten".into()))
            && states.contains(&(third.clone(), "up".into())),
        "{states:?}"
    );
    // The remaining path carries the tunnel.
    assert_eq!(pings(&a, B_INNER, 3), 3, "{}", logs());
    for d in &mut daemons {
        let _ = d.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
